/* Guest memory: creation (backing choice, guest window, memslots), guest
 * RAM access for the rest of mdvm, population/release, statistics. */
#include "mm_internal.h"
#include "dirty.h"

#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/mman.h>
#include <unistd.h>

static const char *const backing_names[MM_BACKING_NR] = {
	[MM_BACKING_AUTO] = "auto",
	[MM_BACKING_HUGETLB] = "hugetlb",
	[MM_BACKING_THP] = "thp",
	[MM_BACKING_MEMFD] = "memfd",
	[MM_BACKING_ANON] = "anon",
};

const char *mm_backing_name(enum mm_backing b)
{
	if ((unsigned)b < MM_BACKING_NR)
		return backing_names[b];
	return "?";
}

int mm_backing_parse(const char *s, enum mm_backing *out)
{
	for (unsigned i = 0; i < MM_BACKING_NR; i++) {
		if (s && strcasecmp(s, backing_names[i]) == 0) {
			*out = (enum mm_backing)i;
			return 0;
		}
	}
	return -1;
}

void mm_log(struct guest_mem *gm, const char *fmt, ...)
{
	char msg[512];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	if (gm && gm->cfg.log) {
		gm->cfg.log(gm->cfg.log_opaque, msg);
		return;
	}
	char line[560];
	int n = snprintf(line, sizeof(line), "mdvm: %s\n", msg);
	if (n > 0 && write(2, line, (size_t)n > sizeof(line) - 1 ? sizeof(line) - 1 : (size_t)n) < 0)
		return;
}

static void seterr(char *err, size_t errlen, const char *fmt, ...)
{
	if (!err || !errlen)
		return;
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(err, errlen, fmt, ap);
	va_end(ap);
}

/* ---- host facts */
#define HP_SYSFS "/sys/kernel/mm/hugepages/hugepages-2048kB/"

/* A sysctl/sysfs number; -1 if unreadable. */
long mm_read_long(const char *path)
{
	FILE *f = fopen(path, "r");
	long v = -1;
	if (!f)
		return -1;
	if (fscanf(f, "%ld", &v) != 1)
		v = -1;
	fclose(f);
	return v;
}

int mm_write_long(const char *path, long v)
{
	FILE *f = fopen(path, "w");
	if (!f)
		return -1;
	int rc = fprintf(f, "%ld\n", v) < 0 ? -1 : 0;
	if (fclose(f) != 0)
		rc = -1;
	return rc;
}

static long hugepages_available(void)
{
	long fr = mm_read_long(HP_SYSFS "free_hugepages"), rs = mm_read_long(HP_SYSFS "resv_hugepages");
	if (fr < 0)
		return -1;
	return fr - (rs > 0 ? rs : 0);
}

static bool thp_available(void)
{
	char buf[128] = "";
	FILE *f = fopen("/sys/kernel/mm/transparent_hugepage/enabled", "r");
	if (!f)
		return false;
	bool ok = fgets(buf, sizeof(buf), f) && !strstr(buf, "[never]");
	fclose(f);
	return ok;
}

static uint64_t ram_hpages(const struct guest_mem *gm)
{
	uint64_t n = 0;
	for (size_t i = 0; i < gm->nranges; i++)
		n += (gm->ranges[i].size + HPAGE_SIZE - 1) >> HPAGE_SHIFT;
	return n;
}

/* Give back what hugetlb_possible raised nr_hugepages by. */
static void hugetlb_unraise(struct guest_mem *gm)
{
	if (gm->hp_new <= gm->hp_old)
		return;
	long cur = mm_read_long(HP_SYSFS "nr_hugepages");
	long to = cur - (gm->hp_new - gm->hp_old);
	if (to < gm->hp_old)
		to = gm->hp_old;
	if (cur >= 0 && mm_write_long(HP_SYSFS "nr_hugepages", to) == 0 && !gm->cfg.quiet)
		mm_log(gm, "backing: lowered nr_hugepages %ld -> %ld", cur,
		       mm_read_long(HP_SYSFS "nr_hugepages"));
	gm->hp_new = gm->hp_old = 0;
}

/* Can the whole of guest RAM live in 2 MiB hugetlb pages? Raises
 * nr_hugepages if asked to and allowed. why: the reason either way. */
static bool hugetlb_possible(struct guest_mem *gm, char *why, size_t whylen)
{
	long need = 0;
	for (size_t i = 0; i < gm->nranges; i++) {
		if ((gm->ranges[i].gpa | gm->ranges[i].size) & (HPAGE_SIZE - 1)) {
			snprintf(why, whylen, "RAM ranges are not multiples of 2 MiB");
			return false;
		}
		need += (long)(gm->ranges[i].size >> HPAGE_SHIFT);
	}
	long avail = hugepages_available();
	if (avail < 0) {
		snprintf(why, whylen, "no 2 MiB hugetlb pages on this host");
		return false;
	}
	if (avail >= need) {
		snprintf(why, whylen, "%ld of %ld free hugepages", need, avail);
		return true;
	}
	if (!gm->cfg.reserve_hugepages) {
		snprintf(why, whylen, "hugetlb: only %ld of %ld hugepages could be reserved; "
			 "--reserve-hugepages raises nr_hugepages as root", avail > 0 ? avail : 0, need);
		return false;
	}
	if (geteuid() != 0) {
		snprintf(why, whylen, "need %ld x 2 MiB hugepages, %ld free, and not root to raise "
			 "nr_hugepages", need, avail);
		return false;
	}
	long old = mm_read_long(HP_SYSFS "nr_hugepages"), want = old + (need - avail);
	if (old < 0 || mm_write_long(HP_SYSFS "nr_hugepages", want) < 0) {
		snprintf(why, whylen, "cannot raise nr_hugepages: %s", strerror(errno));
		return false;
	}
	long now = mm_read_long(HP_SYSFS "nr_hugepages");
	if (hugepages_available() < need) {
		mm_write_long(HP_SYSFS "nr_hugepages", old);
		snprintf(why, whylen, "raising nr_hugepages %ld -> %ld gave only %ld (host memory "
			 "fragmented or short); restored %ld", old, want, now, old);
		return false;
	}
	gm->hp_old = old;
	gm->hp_new = now;
	snprintf(why, whylen, "raised nr_hugepages %ld -> %ld", old, now);
	return true;
}

static int choose_backing(struct guest_mem *gm, char *err, size_t errlen)
{
	char why[200] = "";
	enum mm_backing want = gm->cfg.backing;
	switch (want) {
	case MM_BACKING_HUGETLB:
		if (!hugetlb_possible(gm, why, sizeof(why))) {
			seterr(err, errlen, "hugetlb backing: %s",
			       why + (strncmp(why, "hugetlb: ", 9) ? 0 : 9));
			return -1;
		}
		snprintf(gm->note, sizeof(gm->note), "%s", why);
		break;
	case MM_BACKING_THP:
		snprintf(gm->note, sizeof(gm->note), thp_available() ? "as asked" :
			 "as asked; THP is disabled on this host: 4 KiB pages");
		break;
	case MM_BACKING_MEMFD:
	case MM_BACKING_ANON:
		snprintf(gm->note, sizeof(gm->note), "as asked");
		break;
	case MM_BACKING_AUTO:
		if (hugetlb_possible(gm, why, sizeof(why))) {
			want = MM_BACKING_HUGETLB;
			snprintf(gm->note, sizeof(gm->note), "%s", why);
		} else if (thp_available()) {
			want = MM_BACKING_THP;
			snprintf(gm->note, sizeof(gm->note), "%s", why);
		} else {
			want = MM_BACKING_MEMFD;
			snprintf(gm->note, sizeof(gm->note), "%s; THP disabled", why);
		}
		break;
	default:
		seterr(err, errlen, "unknown backing %d", (int)want);
		return -1;
	}
	gm->backing = want;
	return 0;
}

/* ---- RAM ranges */
bool gfn_is_ram(const struct guest_mem *gm, uint64_t gfn)
{
	uint64_t gpa = gfn << MM_PAGE_SHIFT;
	for (size_t i = 0; i < gm->nranges; i++)
		if (gpa >= gm->ranges[i].gpa && gpa - gm->ranges[i].gpa < gm->ranges[i].size)
			return true;
	return false;
}

static const struct mm_range *find_range(const struct guest_mem *gm, uint64_t gpa, uint64_t len)
{
	for (size_t i = 0; i < gm->nranges; i++) {
		const struct mm_range *r = &gm->ranges[i];
		if (gpa >= r->gpa && gpa - r->gpa < r->size && len <= r->size - (gpa - r->gpa))
			return r;
	}
	return NULL;
}

/* Every byte of [gpa, gpa+len) is RAM (possibly across ranges). */
static bool all_ram(const struct guest_mem *gm, uint64_t gpa, uint64_t len)
{
	while (len) {
		const struct mm_range *r = find_range(gm, gpa, 1);
		if (!r)
			return false;
		uint64_t n = r->gpa + r->size - gpa;
		if (n >= len)
			return true;
		gpa += n;
		len -= n;
	}
	return true;
}

static bool block_in_ram(const struct guest_mem *gm, uint64_t gfn, uint64_t n)
{
	return find_range(gm, gfn << MM_PAGE_SHIFT, n << MM_PAGE_SHIFT) != NULL;
}

/* ---- memslots */
static int slots_setup(struct guest_mem *gm, char *err, size_t errlen)
{
	uint64_t limit = gm->cfg.eager_slot_limit ? gm->cfg.eager_slot_limit : 16ULL << 30;
	gm->lazy_slots = gm->cfg.ram_size > limit;
	size_t cap = 0;
	for (size_t i = 0; i < gm->nranges; i++)
		cap += gm->lazy_slots ? (gm->ranges[i].size + 2 * SLOT_CHUNK - 1) / SLOT_CHUNK + 1 : 1;
	gm->slots = calloc(cap, sizeof(*gm->slots));
	if (!gm->slots) {
		seterr(err, errlen, "out of memory");
		return -1;
	}
	for (size_t i = 0; i < gm->nranges; i++) {
		uint64_t s = gm->ranges[i].gpa, end = s + gm->ranges[i].size;
		if (!gm->lazy_slots) {
			gm->slots[gm->nslots++] = (struct mm_slot){ .gpa = s, .size = end - s };
			continue;
		}
		while (s < end) {
			uint64_t e = (s & ~(SLOT_CHUNK - 1)) + SLOT_CHUNK;
			if (e > end)
				e = end;
			gm->slots[gm->nslots++] = (struct mm_slot){ .gpa = s, .size = e - s };
			s = e;
		}
	}
	return 0;
}

/* Under slot_lock (or during creation). */
static int slot_register(struct guest_mem *gm, uint32_t i)
{
	struct mm_slot *s = &gm->slots[i];
	if (atomic_load(&s->registered))
		return 0;
	if (gm->ops && gm->ops->set_region &&
	    gm->ops->set_region(gm->opaque, i, s->gpa, s->size, gm->base + s->gpa, false) < 0)
		return -(errno ? errno : EIO);
	atomic_store(&s->registered, true);
	atomic_fetch_add(&gm->slots_registered, 1);
	return 0;
}

static int slot_index(const struct guest_mem *gm, uint64_t gpa)
{
	uint32_t lo = 0, hi = gm->nslots;
	while (lo < hi) {
		uint32_t mid = (lo + hi) / 2;
		const struct mm_slot *s = &gm->slots[mid];
		if (gpa < s->gpa)
			hi = mid;
		else if (gpa - s->gpa >= s->size)
			lo = mid + 1;
		else
			return (int)mid;
	}
	return -1;
}

void slot_mark_needed(struct guest_mem *gm, uint64_t gpa)
{
	if (!gm->lazy_slots)
		return;
	int i = slot_index(gm, gpa);
	if (i >= 0 && !atomic_load(&gm->slots[i].registered) && !atomic_load(&gm->slots[i].pending)) {
		atomic_store(&gm->slots[i].pending, true);
		atomic_store(&gm->slots_pending, true);
	}
}

static bool on_uffd_thread(struct guest_mem *gm)
{
	return gm->uffd_running && pthread_equal(pthread_self(), gm->uffd_thread);
}

/* Register the slots populated RAM needs. Call without gm->lock. */
static void slots_flush(struct guest_mem *gm)
{
	if (!gm->lazy_slots || !atomic_load(&gm->slots_pending) || on_uffd_thread(gm))
		return;
	pthread_mutex_lock(&gm->slot_lock);
	atomic_store(&gm->slots_pending, false);
	for (uint32_t i = 0; i < gm->nslots; i++) {
		if (!atomic_load(&gm->slots[i].pending))
			continue;
		atomic_store(&gm->slots[i].pending, false);
		int rc = slot_register(gm, i);
		if (rc)
			mm_log(gm, "registering memslot %u [0x%llx+0x%llx): %s", i,
			       (unsigned long long)gm->slots[i].gpa,
			       (unsigned long long)gm->slots[i].size, strerror(-rc));
	}
	pthread_mutex_unlock(&gm->slot_lock);
}

static bool slot_register_at(struct guest_mem *gm, uint64_t gpa)
{
	int i = slot_index(gm, gpa);
	if (i < 0 || atomic_load(&gm->slots[i].registered))
		return false;
	pthread_mutex_lock(&gm->slot_lock);
	bool created = !atomic_load(&gm->slots[i].registered) && slot_register(gm, (uint32_t)i) == 0;
	pthread_mutex_unlock(&gm->slot_lock);
	return created;
}

bool mm_ensure_slot(struct guest_mem *gm, uint64_t gpa)
{
	if (!gm->lazy_slots || on_uffd_thread(gm))
		return false;
	return slot_register_at(gm, gpa);
}

bool mm_handle_mmio(struct guest_mem *gm, uint64_t gpa, uint8_t *data, uint32_t len, bool is_write)
{
	if (!gm->lazy_slots || !len || !all_ram(gm, gpa, len))
		return false;
	slot_register_at(gm, gpa);
	slot_register_at(gm, gpa + len - 1);
	int rc = is_write ? mm_write(gm, gpa, data, len) : mm_read(gm, gpa, data, len);
	if (rc < 0 && !is_write)
		memset(data, 0xff, len);
	return true;
}

/* ---- population */
static bool populatable(memdesc_t md)
{
	return md == 0 || memdesc_type(md) == MEMDESC_BALLOONED;
}

/* Largest order <= order_max whose aligned block around gfn is RAM, lies
 * in [lo, hi) when clamped, and is wholly populatable, all of one kind with
 * gfn: a folio made for an untouched page never takes in ballooned
 * neighbours (that would hand the balloon's pages back behind the
 * driver's back). -1 if gfn is not populatable. */
static int choose_order(struct guest_mem *gm, uint64_t gfn, unsigned order_max, bool clamp,
			uint64_t lo, uint64_t hi, bool only_unbacked)
{
	memdesc_t kind = mdt_get(&gm->md, gfn);
	/* A ballooned page is backed only where asked. */
	clamp = clamp || memdesc_type(kind) == MEMDESC_BALLOONED;
	for (int k = (int)order_max; k >= 0; k--) {
		uint64_t n = 1ULL << k, b = gfn & ~(n - 1);
		if (clamp && (b < lo || b + n > hi))
			continue;
		if (!block_in_ram(gm, b, n))
			continue;
		if (k == MM_MAX_ORDER && mdt_region_is(&gm->md, b >> REGION_SHIFT, 0))
			return k;
		bool ok = true;
		for (uint64_t g = b; g < b + n && ok; g++) {
			memdesc_t md = mdt_get(&gm->md, g);
			ok = only_unbacked ? md == 0 : populatable(md) && md == kind;
		}
		if (ok)
			return k;
	}
	return -1;
}

/* Publish the folio in the memdesc table first, then map it: the mapping
 * (or userfaultfd unregistration, which wakes faulting threads) lets other
 * threads in, and they must find the folio already there. */
static int populate_one(struct guest_mem *gm, uint64_t gfn, unsigned order,
			enum memdesc_type owner)
{
	struct folio *f = folio_alloc(gm);
	if (!f)
		return -ENOMEM;
	f->gfn = gfn;
	f->order = (uint8_t)order;
	f->owner = (uint8_t)owner;
	atomic_store(&f->gen, atomic_load(&gm->dirty_gen));
	bool newmap;
	int rc = pool_place(gm, f, MM_HPAGE_ANY, NO_HPAGE, &newmap);
	if (rc) {
		atomic_store(&f->refcount, 0);
		folio_free(gm, f);
		return rc;
	}
	memdesc_t was = mdt_get(&gm->md, gfn);   /* the block is all of one kind */
	mdt_set_range(gm, gfn, 1ULL << order, memdesc_make(owner, f));
	gm->folios[order]++;
	slot_mark_needed(gm, gfn << MM_PAGE_SHIFT);
	if (newmap) {
		/* hugetlb: the whole 2 MiB region gets mapped, so every
		 * never-touched page of it gets its folio too (before the map). */
		uint64_t r0 = gfn & ~(uint64_t)(MM_REGION_PAGES - 1);
		for (uint64_t g = r0; g < r0 + MM_REGION_PAGES;) {
			int k = mdt_get(&gm->md, g) == 0 && gfn_is_ram(gm, g)
				? choose_order(gm, g, MM_MAX_ORDER, false, 0, 0, true) : -1;
			if (k < 0) {
				g++;
				continue;
			}
			uint64_t b = g & ~((1ULL << k) - 1);
			if ((rc = populate_one(gm, b, (unsigned)k, MEMDESC_FOLIO)))
				return rc;
			g = b + (1ULL << k);
		}
	}
	if ((rc = map_folio(gm, f, newmap))) {
		atomic_store(&f->refcount, 0);
		mdt_set_range(gm, gfn, 1ULL << order, was);
		gm->folios[order]--;
		pool_unplace(gm, f, true);
		folio_free(gm, f);
		return rc;
	}
	return 0;
}

int populate_locked(struct guest_mem *gm, uint64_t gfn, uint64_t nr, unsigned order_max,
		    enum memdesc_type owner)
{
	uint64_t end = gfn + nr;
	bool clamp = owner != MEMDESC_FOLIO;
	if (end > gm->md.npages)
		end = gm->md.npages;
	for (uint64_t g = gfn; g < end;) {
		memdesc_t md = mdt_get(&gm->md, g);
		struct folio *f = memdesc_folio(md);
		if (f) {
			g = f->gfn + folio_nr_pages(f);
			continue;
		}
		if (!populatable(md) || !gfn_is_ram(gm, g)) {
			g++;
			continue;
		}
		/* A demoted region was made 4 KiB-granular to give memory back:
		 * a touch there costs one page, not a large folio. */
		unsigned om = region_flags(gm, g >> REGION_SHIFT) & REGION_DEMOTED ? 0 : order_max;
		int k = choose_order(gm, g, om, clamp, gfn, end, false);
		if (k < 0) {
			g++;
			continue;
		}
		uint64_t b = g & ~((1ULL << k) - 1);
		int rc = populate_one(gm, b, (unsigned)k, owner);
		if (rc)
			return rc;
		g = b + (1ULL << k);
	}
	return 0;
}

static unsigned order_arg(struct guest_mem *gm, int order)
{
	if (order < 0)
		return gm->fault_order;
	return order > MM_MAX_ORDER ? MM_MAX_ORDER : (unsigned)order;
}

int mm_populate(struct guest_mem *gm, uint64_t gfn, uint64_t nr, int order)
{
	pthread_mutex_lock(&gm->lock);
	int rc = populate_locked(gm, gfn, nr, order_arg(gm, order), MEMDESC_FOLIO);
	pthread_mutex_unlock(&gm->lock);
	slots_flush(gm);
	return rc;
}

/* hugetlb: region r is mapped 2 MiB at a time and holds folios outside
 * [lo, hi). Its pages in [lo, hi) cannot become unbacked: the guest reaches
 * their pieces through that mapping without a fault. */
static bool hugetlb_region_kept(struct guest_mem *gm, uint64_t r, uint64_t lo, uint64_t hi)
{
	if (gm->backing != MM_BACKING_HUGETLB || (region_flags(gm, r) & REGION_DEMOTED))
		return false;
	struct hpage *home = pool_region_home(gm, r, NULL);
	if (!home || !home->mapped)
		return false;
	for (uint64_t g = r << REGION_SHIFT; g < (r + 1) << REGION_SHIFT; g++)
		if ((g < lo || g >= hi) && memdesc_folio(mdt_get(&gm->md, g)))
			return true;
	return false;
}

/* *freed (may be NULL) is increased by the host memory given back: every
 * released folio on memfd/anon/thp and demoted hugetlb regions, whole 2 MiB
 * pages on hugetlb (a partly released hugepage stays allocated). */
static int release_range_freed_locked(struct guest_mem *gm, uint64_t gfn, uint64_t nr,
				      enum memdesc_type new_type, uint64_t *freed)
{
	if (new_type != MEMDESC_UNBACKED && new_type != MEMDESC_BALLOONED)
		return -EINVAL;
	uint64_t end = gfn + nr, checked = UINT64_MAX, bytes = 0, live0 = gm->pool.live;
	bool kept = false;
	bool hugetlb = gm->backing == MM_BACKING_HUGETLB;
	int ret = 0;
	if (end > gm->md.npages)
		end = gm->md.npages;
	/* Folios first (a hugetlb region unmaps when its last one goes)... */
	for (uint64_t g = gfn; g < end;) {
		struct folio *f = memdesc_folio(mdt_get(&gm->md, g));
		if (!f) {
			g++;
			continue;
		}
		uint64_t r = g >> REGION_SHIFT;
		if (new_type == MEMDESC_UNBACKED && r != checked) {
			checked = r;   /* releases in r do not change the answer */
			kept = hugetlb_region_kept(gm, r, gfn, end);
		}
		if (new_type == MEMDESC_UNBACKED && kept) {
			/* Not split for nothing: the folio stays as it is. */
			ret = -EOPNOTSUPP;
			g = f->gfn + folio_nr_pages(f);
			continue;
		}
		int rc = folio_split_around(gm, f, gfn, end);
		if (rc) {
			if (freed)   /* what went back before this folio still counts */
				*freed += bytes;
			return rc;
		}
		f = memdesc_folio(mdt_get(&gm->md, g));
		uint64_t next = f->gfn + folio_nr_pages(f);
		bool counted = !hugetlb || f->hpage == SIDE_HPAGE;
		if ((rc = folio_release_locked(gm, f, new_type, gfn, end)))
			ret = rc;
		else if (counted)
			bytes += (next - g) << MM_PAGE_SHIFT;
		g = next;
	}
	/* ...then pages without host memory change type. */
	for (uint64_t g = gfn; g < end; g++) {
		enum memdesc_type t = memdesc_type(mdt_get(&gm->md, g));
		if ((t != MEMDESC_UNBACKED && t != MEMDESC_BALLOONED) || t == new_type)
			continue;
		struct hpage *home = hugetlb && !(region_flags(gm, g >> REGION_SHIFT) & REGION_DEMOTED)
			? pool_region_home(gm, g >> REGION_SHIFT, NULL) : NULL;
		if (home && home->mapped && new_type == MEMDESC_UNBACKED) {
			/* A ballooned page of a still mapped hugetlb region (deflate,
			 * reset): the guest reaches its piece without a fault, so it
			 * must be RAM again. Its piece is free in the hugepage and
			 * was zeroed when it was ballooned: place it back as a 4 KiB
			 * folio, keeping what is there (without MUST_TELL_HOST the
			 * guest may use a page once it asked to deflate it, virtio
			 * 1.2 §5.5.6.1). */
			int rc = populate_locked(gm, g, 1, 0, MEMDESC_FOLIO);
			if (rc)
				ret = rc;
			continue;
		}
		mdt_set_range(gm, g, 1, memdesc_make(new_type, NULL));
	}
	if (hugetlb && gm->pool.live < live0)
		bytes += (live0 - gm->pool.live) * HPAGE_SIZE;
	if (freed)
		*freed += bytes;
	return ret;
}

int release_range_locked(struct guest_mem *gm, uint64_t gfn, uint64_t nr,
			 enum memdesc_type new_type)
{
	return release_range_freed_locked(gm, gfn, nr, new_type, NULL);
}


int mm_poison_page(struct guest_mem *gm, uint64_t gfn, bool *reserved)
{
	enum memdesc_type t = memdesc_type(memdesc_lookup(gm, gfn));
	int rc = 0;

	if (reserved)
		*reserved = false;
	/* A never-touched page has no host memory to fail: back it first, so
	 * the guest still finds the error there. */
	if (t == MEMDESC_UNBACKED || t == MEMDESC_BALLOONED)
		rc = mm_populate(gm, gfn, 1, 0);
	if (rc == 0)
		rc = memdesc_memory_failure(gm, gfn);
	/* The owner's answer is not the verdict: a reserved (firmware) page
	 * reports -EIO after it was poisoned, and a page that stayed unbacked
	 * reports 0 without being poisoned. */
	if (memdesc_type(memdesc_lookup(gm, gfn)) == MEMDESC_POISONED) {
		if (reserved)
			*reserved = rc == -EIO;
		/* Not a guest write, but the page changed: a migration in
		 * progress must send its new (poisoned) state again. */
		dirty_tracker_note(gm, gfn, 1);
		return 0;
	}
	return rc < 0 ? rc : -EIO;
}

long mm_unpoison_range(struct guest_mem *gm, uint64_t gfn, uint64_t nr)
{
	uint64_t end = gfn + nr;
	long n = 0;
	int rc = 0;
	pthread_mutex_lock(&gm->lock);
	if (end > gm->md.npages)
		end = gm->md.npages;
	for (uint64_t g = gfn; g < end && !rc; g++) {
		if (memdesc_type(mdt_get(&gm->md, g)) != MEMDESC_POISONED || !gfn_is_ram(gm, g))
			continue;
		mdt_set_range(gm, g, 1, memdesc_make(MEMDESC_UNBACKED, NULL));
		n++;
		if (gm->backing != MM_BACKING_HUGETLB) {
			/* A fresh placeholder (or MADV_DONTNEED, which drops the
			 * poison marker): the next touch faults in new memory. The
			 * failed host piece stays quarantined. */
			rc = unmap_range(gm, g, 1);
			continue;
		}
		if (region_flags(gm, g >> REGION_SHIFT) & REGION_DEMOTED) {
			/* 4 KiB side-file mapping: drop the poison marker. */
			madvise(gm->base + (g << MM_PAGE_SHIFT), MM_PAGE_SIZE, MADV_DONTNEED);
			continue;
		}
		/* hugetlb: the 2 MiB page stays; give the piece back, zeroed. */
		uint32_t idx;
		struct hpage *h = pool_region_home(gm, g >> REGION_SHIFT, &idx);
		bool mapped = h && h->mapped;
		if (h)
			pool_unquarantine(gm, idx, g & (MM_REGION_PAGES - 1));
		if (mapped) {
			memset(gm->base + (g << MM_PAGE_SHIFT), 0, MM_PAGE_SIZE);
			rc = populate_locked(gm, g, 1, 0, MEMDESC_FOLIO);
		}
	}
	pthread_mutex_unlock(&gm->lock);
	if (n)
		dirty_tracker_note(gm, gfn, end - gfn);
	return rc ? rc : n;
}

int mm_release_range_freed(struct guest_mem *gm, uint64_t gfn, uint64_t nr,
			   enum memdesc_type new_type, uint64_t *freed)
{
	uint64_t before[MEMDESC_NR_TYPES];
	if (gfn >= gm->md.npages)
		return new_type == MEMDESC_UNBACKED || new_type == MEMDESC_BALLOONED ? 0 : -EINVAL;
	if (nr > gm->md.npages - gfn)
		nr = gm->md.npages - gfn;
	pthread_mutex_lock(&gm->lock);
	memcpy(before, gm->pages, sizeof(before));
	int rc = release_range_freed_locked(gm, gfn, nr, new_type, freed);
	bool changed = memcmp(before, gm->pages, sizeof(before)) != 0;
	pthread_mutex_unlock(&gm->lock);
	slots_flush(gm);   /* a deflated hugetlb piece may have become a folio */
	/* After the change: a sender that takes the bit sees the new type. */
	if (changed)
		dirty_tracker_note(gm, gfn, nr);
	return rc;
}

int mm_release_range(struct guest_mem *gm, uint64_t gfn, uint64_t nr, enum memdesc_type new_type)
{
	return mm_release_range_freed(gm, gfn, nr, new_type, NULL);
}

/* ---- creation */
struct guest_mem *mm_create(const struct mm_config *cfg, const struct mm_hv_ops *ops,
			    void *opaque, char *err, size_t errlen)
{
	if (!cfg || cfg->ram_size == 0 || cfg->ram_size % MM_PAGE_SIZE) {
		seterr(err, errlen, "guest RAM size must be a non-zero multiple of 4 KiB");
		return NULL;
	}
	struct guest_mem *gm = calloc(1, sizeof(*gm));
	if (!gm) {
		seterr(err, errlen, "out of memory");
		return NULL;
	}
	gm->cfg = *cfg;
	gm->ops = ops;
	gm->opaque = opaque;
	gm->uffd = gm->stop_fd = -1;
	gm->pool.fd = -1;
	atomic_store(&gm->dirty_gen, 1);
	pthread_mutex_init(&gm->lock, NULL);
	pthread_mutex_init(&gm->slot_lock, NULL);
	unsigned fp = cfg->fault_pages ? cfg->fault_pages : MM_REGION_PAGES;
	gm->fault_order = 0;
	while ((1u << (gm->fault_order + 1)) <= fp && gm->fault_order < MM_MAX_ORDER)
		gm->fault_order++;

	bool hole = cfg->hole_end > cfg->hole_start;
	uint64_t low = cfg->ram_size, high = 0;
	if (hole && low > cfg->hole_start) {
		low = cfg->hole_start;
		high = cfg->ram_size - low;
	}
	if (low)
		gm->ranges[gm->nranges++] = (struct mm_range){ 0, low };
	if (high)
		gm->ranges[gm->nranges++] = (struct mm_range){ cfg->hole_end, high };
	struct mm_range *last = &gm->ranges[gm->nranges - 1];
	gm->span = last->gpa + last->size;
	if (hole && gm->span < cfg->hole_end)
		gm->span = cfg->hole_end;   /* type the whole hole, device pages included */

	if (choose_backing(gm, err, errlen) < 0)
		goto fail;

	/* The guest window: GPA 0 at a 2 MiB-aligned base, never-touched
	 * RAM as MAP_NORESERVE placeholders, the rest PROT_NONE. */
	size_t rawlen = gm->span + HPAGE_SIZE;
	uint8_t *raw = mmap(NULL, rawlen, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	if (raw == MAP_FAILED) {
		seterr(err, errlen, "reserving %llu bytes of address space: %s",
		       (unsigned long long)gm->span, strerror(errno));
		goto fail;
	}
	gm->base = (uint8_t *)(((uintptr_t)raw + HPAGE_SIZE - 1) & ~(uintptr_t)(HPAGE_SIZE - 1));
	if (gm->base > raw)
		munmap(raw, (size_t)(gm->base - raw));
	if (gm->base + gm->span < raw + rawlen)
		munmap(gm->base + gm->span, (size_t)(raw + rawlen - (gm->base + gm->span)));

	uint64_t npages = gm->span >> MM_PAGE_SHIFT;
	if (mdt_init(&gm->md, npages) < 0) {
		seterr(err, errlen, "memdesc table: out of address space");
		goto fail;
	}
	gm->pages[MEMDESC_UNBACKED] = npages;
	/* Type every non-RAM gap (the hole, and below it for small guests) as MMIO. */
	uint64_t prev = 0;
	for (size_t i = 0; i <= gm->nranges; i++) {
		uint64_t s0 = i < gm->nranges ? gm->ranges[i].gpa >> MM_PAGE_SHIFT : npages;
		if (s0 > prev)
			mdt_set_range(gm, prev, s0 - prev, MEMDESC_MMIO);
		if (i < gm->nranges)
			prev = (gm->ranges[i].gpa + gm->ranges[i].size) >> MM_PAGE_SHIFT;
	}
	folio_cache_init(&gm->fc);
	int prc = pool_init(gm, err, errlen);
	if (prc == -2) {
		/* The hugepages went to someone else since choose_backing. */
		long avail = hugepages_available();
		pool_destroy(gm);
		hugetlb_unraise(gm);
		char why[120];
		snprintf(why, sizeof(why), "hugetlb: only %ld of %llu hugepages could be reserved",
			 avail > 0 ? avail : 0, (unsigned long long)ram_hpages(gm));
		if (gm->cfg.backing != MM_BACKING_AUTO) {
			seterr(err, errlen, "hugetlb backing: %s", why + strlen("hugetlb: "));
			goto fail;
		}
		gm->backing = thp_available() ? MM_BACKING_THP : MM_BACKING_MEMFD;
		snprintf(gm->note, sizeof(gm->note), "%s", why);
		prc = pool_init(gm, err, errlen);
	}
	if (prc < 0)
		goto fail;

	char why[160] = "";
	bool eager = cfg->lazy < 0;
	if (!eager && uffd_start(gm, why, sizeof(why)) < 0)
		eager = true;
	for (size_t i = 0; i < gm->nranges; i++) {
		int rc = placeholder_init(gm, gm->ranges[i].gpa, gm->ranges[i].size);
		if (rc) {
			seterr(err, errlen, "guest RAM placeholder: %s", strerror(-rc));
			goto fail;
		}
	}
	if (slots_setup(gm, err, errlen) < 0)
		goto fail;
	for (uint32_t i = 0; i < gm->nslots; i++) {
		if (gm->lazy_slots && gm->slots[i].gpa != 0)
			continue;
		int rc = slot_register(gm, i);
		if (rc) {
			seterr(err, errlen, "registering guest RAM slot %u: %s", i, strerror(-rc));
			goto fail;
		}
	}
	if (eager) {
		if (why[0])
			snprintf(gm->note + strlen(gm->note), sizeof(gm->note) - strlen(gm->note),
				 "; %s: all RAM populated up front", why);
		for (size_t i = 0; i < gm->nranges; i++) {
			int rc = populate_locked(gm, gm->ranges[i].gpa >> MM_PAGE_SHIFT,
						 gm->ranges[i].size >> MM_PAGE_SHIFT, gm->fault_order,
						 MEMDESC_FOLIO);
			if (rc) {
				seterr(err, errlen, "populating guest RAM: %s", strerror(-rc));
				goto fail;
			}
		}
	}
	slots_flush(gm);
	if (!cfg->quiet)
		mm_log(gm, "backing: %s (%s)", mm_backing_name(gm->backing), gm->note);
	return gm;
fail:
	mm_destroy(gm);
	return NULL;
}

void mm_destroy(struct guest_mem *gm)
{
	if (!gm)
		return;
	uffd_stop(gm);
	if (gm->base)
		munmap(gm->base, gm->span);
	mdt_destroy(&gm->md);
	folio_cache_destroy(&gm->fc);
	pool_destroy(gm);
	free(gm->slots);
	hugetlb_unraise(gm);
	pthread_mutex_destroy(&gm->lock);
	pthread_mutex_destroy(&gm->slot_lock);
	free(gm);
}

enum mm_backing mm_backing(const struct guest_mem *gm) { return gm->backing; }
const char *mm_backing_note(const struct guest_mem *gm) { return gm->note; }
uint64_t mm_ram_size(const struct guest_mem *gm) { return gm->cfg.ram_size; }
void *mm_guest_base(struct guest_mem *gm) { return gm->base; }
uint32_t mm_dirty_gen(struct guest_mem *gm) { return atomic_load(&gm->dirty_gen); }
uint32_t mm_dirty_gen_advance(struct guest_mem *gm) { return atomic_fetch_add(&gm->dirty_gen, 1) + 1; }

size_t mm_ram_ranges(const struct guest_mem *gm, struct mm_range *out, size_t max)
{
	size_t n = gm->nranges < max ? gm->nranges : max;
	for (size_t i = 0; i < n; i++)
		out[i] = gm->ranges[i];
	return gm->nranges;
}

/* ---- access */
static bool all_zero(const uint8_t *p, size_t n)
{
	for (size_t i = 0; i < n; i++)
		if (p[i])
			return false;
	return true;
}

void *mm_gpa_to_hva(struct guest_mem *gm, uint64_t gpa, uint64_t len)
{
	if (!len)
		len = 1;
	if (!find_range(gm, gpa, len))
		return NULL;
	uint64_t g0 = gpa >> MM_PAGE_SHIFT, g1 = (gpa + len - 1) >> MM_PAGE_SHIFT;
	pthread_mutex_lock(&gm->lock);
	int rc = populate_locked(gm, g0, g1 - g0 + 1, gm->fault_order, MEMDESC_FOLIO);
	pthread_mutex_unlock(&gm->lock);
	slots_flush(gm);
	if (rc)
		return NULL;
	return gm->base + gpa;
}

int mm_read(struct guest_mem *gm, uint64_t gpa, void *buf, size_t len)
{
	if (!all_ram(gm, gpa, len)) {
		errno = EFAULT;
		return -1;
	}
	uint8_t *out = buf;
	while (len) {
		uint64_t gfn = gpa >> MM_PAGE_SHIFT;
		memdesc_t md = mdt_get(&gm->md, gfn);
		struct folio *f = memdesc_folio(md);
		size_t n;
		if (f) {
			uint64_t end = (f->gfn + folio_nr_pages(f)) << MM_PAGE_SHIFT;
			n = end > gpa && end - gpa < len ? (size_t)(end - gpa) : len;
			if (end <= gpa)   /* raced with a split: one page at a time */
				n = MM_PAGE_SIZE - (gpa & (MM_PAGE_SIZE - 1)) < len
				    ? MM_PAGE_SIZE - (gpa & (MM_PAGE_SIZE - 1)) : len;
			memcpy(out, gm->base + gpa, n);
		} else {
			n = MM_PAGE_SIZE - (gpa & (MM_PAGE_SIZE - 1));
			if (n > len)
				n = len;
			if (memdesc_type(md) == MEMDESC_POISONED) {
				errno = EIO;
				return -1;
			}
			memset(out, 0, n);   /* never touched or ballooned: zero */
		}
		out += n;
		gpa += n;
		len -= n;
	}
	return 0;
}

int mm_write(struct guest_mem *gm, uint64_t gpa, const void *buf, size_t len)
{
	if (!all_ram(gm, gpa, len)) {
		errno = EFAULT;
		return -1;
	}
	const uint8_t *in = buf;
	while (len) {
		uint64_t gfn = gpa >> MM_PAGE_SHIFT;
		memdesc_t md = mdt_get(&gm->md, gfn);
		size_t n = MM_PAGE_SIZE - (gpa & (MM_PAGE_SIZE - 1));
		if (n > len)
			n = len;
		if (memdesc_type(md) == MEMDESC_POISONED) {
			errno = EIO;
			return -1;
		}
		if (!memdesc_folio(md)) {
			if (md == 0 && all_zero(in, n))
				goto next;   /* never-touched RAM already reads as zero */
			pthread_mutex_lock(&gm->lock);
			int rc = populate_locked(gm, gfn, 1, gm->fault_order, MEMDESC_FOLIO);
			pthread_mutex_unlock(&gm->lock);
			slots_flush(gm);
			if (rc) {
				errno = -rc;
				return -1;
			}
			md = mdt_get(&gm->md, gfn);
		}
		struct folio *f = memdesc_folio(md);
		if (f) {
			uint64_t end = (f->gfn + folio_nr_pages(f)) << MM_PAGE_SHIFT;
			if (end > gpa + n)
				n = end - gpa < len ? (size_t)(end - gpa) : len;
		}
		memcpy(gm->base + gpa, in, n);
		memdesc_mark_dirty(gm, gfn);
next:
		in += n;
		gpa += n;
		len -= n;
	}
	return 0;
}

void mm_mark_dirty(struct guest_mem *gm, uint64_t gpa, uint64_t len)
{
	if (!len)
		return;
	uint64_t g = gpa >> MM_PAGE_SHIFT, end = (gpa + len - 1) >> MM_PAGE_SHIFT;
	while (g <= end) {
		memdesc_t md = mdt_get(&gm->md, g);
		struct folio *f = memdesc_folio(md);
		memdesc_mark_dirty(gm, g);
		g = f && f->gfn + folio_nr_pages(f) > g ? f->gfn + folio_nr_pages(f) : g + 1;
	}
}

int mm_mark_reserved(struct guest_mem *gm, uint64_t gpa, uint64_t len)
{
	if (!len)
		return 0;
	uint64_t lo = gpa >> MM_PAGE_SHIFT, hi = (gpa + len + MM_PAGE_SIZE - 1) >> MM_PAGE_SHIFT;
	if (hi > gm->md.npages || hi < lo) {
		errno = ERANGE;
		return -1;
	}
	int rc = 0;
	pthread_mutex_lock(&gm->lock);
	/* Existing folios: split to the range, retype. */
	for (uint64_t g = lo; g < hi && !rc;) {
		memdesc_t md = mdt_get(&gm->md, g);
		struct folio *f = memdesc_folio(md);
		if (f && memdesc_type(md) == MEMDESC_FOLIO) {
			if ((rc = folio_split_around(gm, f, lo, hi)))
				break;
			f = memdesc_folio(mdt_get(&gm->md, g));
			f->owner = MEMDESC_RESERVED;
			mdt_set_range(gm, f->gfn, folio_nr_pages(f), memdesc_make(MEMDESC_RESERVED, f));
			g = f->gfn + folio_nr_pages(f);
			continue;
		}
		if (md == MEMDESC_MMIO)
			mdt_set_range(gm, g, 1, memdesc_make(MEMDESC_RESERVED, NULL));
		g++;
	}
	/* Never-touched RAM: reserved folios of their own. */
	if (!rc)
		rc = populate_locked(gm, lo, hi - lo, MM_MAX_ORDER, MEMDESC_RESERVED);
	pthread_mutex_unlock(&gm->lock);
	slots_flush(gm);
	if (rc) {
		errno = -rc;
		return -1;
	}
	return 0;
}

/* ---- statistics */
static const char *const occ_labels[MM_OCC_BUCKETS] = {
	"1-63", "64-127", "128-191", "192-255", "256-319", "320-383", "384-447", "448-511", "512",
};

const char *mm_occupancy_label(unsigned bucket)
{
	return bucket < MM_OCC_BUCKETS ? occ_labels[bucket] : "?";
}

void mm_query_stats(struct guest_mem *gm, struct mm_stats *st)
{
	memset(st, 0, sizeof(*st));
	pthread_mutex_lock(&gm->lock);
	st->ram_size = gm->cfg.ram_size;
	st->backing = gm->backing;
	memcpy(st->pages, gm->pages, sizeof(st->pages));
	memcpy(st->folios, gm->folios, sizeof(st->folios));
	for (unsigned k = 0; k <= MM_MAX_ORDER; k++)
		st->populated_bytes += gm->folios[k] << (k + MM_PAGE_SHIFT);
	struct mm_pool *p = &gm->pool;
	for (uint64_t c = 0; c < p->nchunks; c++) {
		if (!p->chunks[c])
			continue;
		for (unsigned i = 0; i < HPAGE_CHUNK; i++) {
			struct hpage *h = &p->chunks[c][i];
			if (!h->nr_used)
				continue;
			st->hugepages_in_use++;
			st->occupancy[h->nr_used >= MM_REGION_PAGES ? MM_OCC_BUCKETS - 1 : h->nr_used / 64]++;
		}
	}
	st->hugepages_total = p->live;
	st->memdesc_bytes = mdt_bytes(&gm->md);
	st->leaf_tables = gm->md.leaves_live;
	st->folio_bytes = (uint64_t)gm->fc.nslabs * FOLIO_SLAB_SIZE * sizeof(struct folio) +
			  gm->fc.cap * sizeof(void *);
	st->pool_bytes = pool_bytes(p);
	st->metadata_bytes = st->memdesc_bytes + st->folio_bytes + st->pool_bytes +
			     sizeof(*gm) + gm->nslots * sizeof(struct mm_slot);
	st->faults = atomic_load(&gm->faults);
	st->slots_registered = atomic_load(&gm->slots_registered);
	st->slots_total = gm->nslots;
	st->dirty_gen = atomic_load(&gm->dirty_gen);
	pthread_mutex_unlock(&gm->lock);
}
