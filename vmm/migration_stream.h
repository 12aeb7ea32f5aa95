/* The migration stream (docs/migration.md): a versioned header, then
 * sections, each with a type, a length and CRC32C checksums of header and
 * payload. I/O through io_uring. */
#ifndef MDVM_MIGRATION_STREAM_H
#define MDVM_MIGRATION_STREAM_H
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define MIG_MAGIC        "MDVM-MIG"
#define MIG_VERSION      4        /* 2: SYNC and MCE sections, END flags; 3: PREFAULT;
				     4: MIG_END_CONFIRM */
#define MIG_SECTION_MAX  (16u << 20)      /* payload bytes */
#define MIG_ACK_OK       0x4b4f4b4fu      /* "OKOK": destination loaded everything */
#define MIG_ACK_FAIL     0x4c494146u      /* "FAIL" */
#define MIG_ACK_SYNC     0x434e5953u      /* "SYNC": everything before the SYNC section is loaded */
#define MIG_ACK_GO       0x4f474f47u      /* "GOGO": source to destination after MIG_ACK_OK: run */

enum mig_section_type {
	MIG_SEC_CONFIG = 1,   /* guest shape: RAM ranges, vCPUs */
	MIG_SEC_RAM,          /* page records */
	MIG_SEC_VM,           /* KVM clock, PIC, IOAPIC, PIT */
	MIG_SEC_VCPU,         /* one vCPU */
	MIG_SEC_DEVICE,       /* one device: name + its own blob */
	MIG_SEC_END,          /* totals; nothing follows */
	MIG_SEC_SYNC,         /* u64 sequence: the destination answers MIG_ACK_SYNC once applied */
	MIG_SEC_MCE,          /* machine-check registers and queued errors (vmm/mce.c) */
	MIG_SEC_PREFAULT,     /* hint: mig_ram_rec runs pass 1 will fill (kind RAM_DATA) */
	MIG_SEC_NR,
};

struct mig_stream_hdr {
	char magic[8];
	uint32_t version;
	uint32_t crc;         /* CRC32C of magic + version */
};

struct mig_section_hdr {
	uint32_t type;
	uint32_t len;         /* payload bytes */
	uint32_t crc;         /* CRC32C of the payload */
	uint32_t hcrc;        /* CRC32C of type, len, crc */
};

/* RAM record: 16 bytes, then for RAM_DATA a presence bitmap of
 * ceil(npages/64) u64 words and the 4 KiB data of each present page (the
 * others are zero). A folio goes as one record. */
enum mig_ram_kind {
	RAM_DATA = 1,         /* backed; present pages carry data, others zero */
	RAM_ZERO,             /* backed on the source, all zero */
	RAM_UNBACKED,         /* never touched / released */
	RAM_BALLOONED,        /* given back through the balloon */
	RAM_POISONED,         /* memory failure */
	RAM_KIND_NR,
};
#define RAM_RESERVED 0x80     /* flag on kind: owner type is "reserved" */
struct mig_ram_rec {
	uint64_t gfn;
	uint32_t npages;
	uint8_t kind;
	uint8_t order;        /* folio order on the source */
	uint16_t pad;
};

struct mig_end {
	uint64_t sections;    /* sections before END */
	uint64_t ram_pages;   /* frames covered by RAM records */
	uint64_t data_pages;  /* pages carrying data */
	uint32_t ncpus;
	uint32_t flags;       /* MIG_END_PAUSED */
};
#define MIG_END_PAUSED 1u     /* the source's guest was paused: the destination stays paused */
#define MIG_END_CONFIRM 2u    /* the source answers MIG_ACK_OK with MIG_ACK_GO; start only on it */

uint32_t crc32c(uint32_t crc, const void *buf, size_t len);

/* ---- sender: a few buffers in flight; a section is built in place. */
struct mig_out;
struct mig_out *mig_out_create(int fd, char *err, size_t errlen);
void  mig_out_destroy(struct mig_out *o);
/* Raw bytes (the stream header). */
int   mig_out_raw(struct mig_out *o, const void *buf, size_t len);
/* Payload area of at least `cap` bytes (<= MIG_SECTION_MAX) in a free buffer. */
void *mig_out_begin(struct mig_out *o, size_t cap);
/* Checksum and queue the section begun last; 0 or -errno. */
int   mig_out_commit(struct mig_out *o, uint32_t type, size_t len);
/* The same with the payload's CRC32C already computed by the caller (while
 * the data was hot in cache). */
int   mig_out_commit_crc(struct mig_out *o, uint32_t type, size_t len, uint32_t crc);
int   mig_out_flush(struct mig_out *o);   /* wait for everything queued */
uint64_t mig_out_bytes(const struct mig_out *o);   /* bytes handed to the socket */
uint64_t mig_out_sections(const struct mig_out *o);
uint64_t mig_out_queued(const struct mig_out *o);  /* bytes committed so far */
int   mig_out_error(const struct mig_out *o);      /* first -errno, or 0 */

/* ---- receiver */
struct mig_in;
struct mig_in *mig_in_create(int fd, char *err, size_t errlen);
void  mig_in_destroy(struct mig_in *i);
/* Read and check the stream header. 0 or -1 with err. */
int   mig_in_header(struct mig_in *i, char *err, size_t errlen);
/* Next section, checked (length, checksums). payload valid until the next
 * call. 0 or -1 with err. */
int   mig_in_section(struct mig_in *i, uint32_t *type, void **payload, uint32_t *len,
		     char *err, size_t errlen);
uint64_t mig_in_bytes(const struct mig_in *i);
/* A section read piecewise (RAM: pages go straight to guest memory): begin
 * (header checked), then take (small items, <= 64 KiB, pointer valid until
 * the next call) and read (into the caller's memory), then end, which
 * checks that all of it was used and its checksum. What was read before a
 * failed end is not to be trusted (the destination gives up). */
int   mig_in_section_begin(struct mig_in *i, uint32_t *type, uint32_t *len, char *err, size_t errlen);
const void *mig_in_take(struct mig_in *i, uint32_t n, char *err, size_t errlen);
int   mig_in_read(struct mig_in *i, void *dst, uint32_t n, char *err, size_t errlen);
uint32_t mig_in_left(const struct mig_in *i);
int   mig_in_section_end(struct mig_in *i, char *err, size_t errlen);
/* The rest of a begun section, whole (as mig_in_section). */
int   mig_in_section_payload(struct mig_in *i, void **payload, char *err, size_t errlen);
/* Blocking exact read/write of a few bytes (acknowledgement). */
int   mig_read_full(int fd, void *buf, size_t len);
int   mig_write_full(int fd, const void *buf, size_t len);
#endif
