/* Guest-physical memory, managed host-side. The only door between the rest of
 * mdvm and guest RAM. mm/ knows nothing of KVM: it reaches the hypervisor only
 * through struct mm_hv_ops, which vmm/ implements with KVM memslot ioctls. */
#ifndef MDVM_MM_H
#define MDVM_MM_H
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct guest_mem;

enum mm_backing {
	MM_BACKING_AUTO = 0,  /* best available: hugetlb > thp > memfd > anon */
	MM_BACKING_HUGETLB,   /* hugetlbfs memfd, 2 MiB pages */
	MM_BACKING_THP,       /* anonymous memory + MADV_HUGEPAGE */
	MM_BACKING_MEMFD,     /* shmem memfd, 4 KiB pages */
	MM_BACKING_ANON,      /* anonymous memory, 4 KiB pages */
};
const char *mm_backing_name(enum mm_backing b);
int mm_backing_parse(const char *s, enum mm_backing *out);  /* 0 or -1 */

/* The narrow hypervisor interface mm/ uses. A region is a range of guest
 * physical addresses backed by [hva, hva+size) of this process. */
struct mm_hv_ops {
	/* Create/replace (size > 0) or delete (size == 0) region `slot`. */
	int (*set_region)(void *opaque, uint32_t slot, uint64_t gpa, uint64_t size,
			  void *hva, bool log_dirty);
};

struct mm_config {
	uint64_t ram_size;        /* bytes, multiple of 4 KiB */
	enum mm_backing backing;
	bool reserve_hugepages;   /* may raise /proc/sys/vm/nr_hugepages (root) */
	uint64_t hole_start, hole_end;  /* MMIO hole; RAM above hole_start moves to hole_end */
};

/* Creates guest RAM and registers it through ops (ops may be NULL: no
 * hypervisor, as in unit tests). On failure returns NULL with err filled. */
struct guest_mem *mm_create(const struct mm_config *cfg, const struct mm_hv_ops *ops,
			    void *opaque, char *err, size_t errlen);
void mm_destroy(struct guest_mem *gm);

enum mm_backing mm_backing(const struct guest_mem *gm);  /* resolved kind */
uint64_t mm_ram_size(const struct guest_mem *gm);

/* Guest RAM ranges in ascending GPA order (for the e820/PVH map and dumps). */
struct mm_range { uint64_t gpa, size; };
size_t mm_ram_ranges(const struct guest_mem *gm, struct mm_range *out, size_t max);

/* Host pointer to [gpa, gpa+len) if it lies wholly inside one RAM range, else
 * NULL. The pointer is valid while the memory exists; writing through it is a
 * guest-memory write that the caller must report with mm_mark_dirty(). */
void *mm_gpa_to_hva(struct guest_mem *gm, uint64_t gpa, uint64_t len);
/* Copy in/out of guest RAM; -1 (errno EFAULT) if any byte is not RAM.
 * mm_write marks the pages dirty through the memdesc owner path. */
int mm_read(struct guest_mem *gm, uint64_t gpa, void *buf, size_t len);
int mm_write(struct guest_mem *gm, uint64_t gpa, const void *buf, size_t len);
void mm_mark_dirty(struct guest_mem *gm, uint64_t gpa, uint64_t len);
/* Type a range as reserved/firmware (boot structures). */
int mm_mark_reserved(struct guest_mem *gm, uint64_t gpa, uint64_t len);

#endif
