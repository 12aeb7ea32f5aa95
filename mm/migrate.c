/* Folio migration: move a live folio's data to another host location while
 * the vCPUs run. Two ways to keep guest writes from being lost (measured in
 * docs/compaction.md):
 *   wp:    userfaultfd write-protect the folio's range of the guest window
 *          (KVM writes through get_user_pages(FOLL_WRITE), which faults on
 *          it and blocks the writing vCPU in the kernel), copy, MAP_FIXED the
 *          new location over the GPA (KVM follows through its MMU notifier),
 *          wake the blocked writers. Only a vCPU writing this folio waits,
 *          and only for one copy.
 *   pause: stop every vCPU (struct mm_pause_ops), copy a batch, remap,
 *          resume. Every vCPU waits for the whole batch.
 * The old location goes back to the pool (punched). */
#include "mm_internal.h"
#include "migrate.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>
#include <time.h>

static uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

const char *mm_migrate_method_name(enum mm_migrate_method m)
{
	switch (m) {
	case MM_MIGRATE_AUTO: return "auto";
	case MM_MIGRATE_WP: return "uffd-wp";
	case MM_MIGRATE_PAUSE: return "pause";
	}
	return "?";
}

bool mm_migrate_have_wp(struct guest_mem *gm)
{
	return gm->uffd >= 0 && gm->have_wp;
}

const char *mm_migrate_strerror(int rc)
{
	switch (rc) {
	case 0: return "moved";
	case MM_MIGRATE_POISONED: return "poisoned";
	case MM_MIGRATE_LOCKED: return "locked";
	case MM_MIGRATE_PINNED: return "pinned";
	case MM_MIGRATE_MIGRATING: return "being migrated";
	case MM_MIGRATE_BUSY: return "in use";
	case -ENOENT: return "no folio there";
	case -EOPNOTSUPP: return "hugetlb moves whole 2 MiB folios only";
	case -ENOSPC: return "no room at the destination";
	default: return strerror(-rc);
	}
}

int64_t mm_host_bytes(struct guest_mem *gm)
{
	struct stat st;
	if (gm->pool.fd < 0 || fstat(gm->pool.fd, &st) < 0)
		return -1;
	int64_t n = (int64_t)st.st_blocks * 512;
	if (gm->pool.side_fd >= 0 && fstat(gm->pool.side_fd, &st) == 0)
		n += (int64_t)st.st_blocks * 512;   /* demoted regions' pages */
	return n;
}

int mm_migrate_begin(struct guest_mem *gm, struct mm_migrate_ctx *c, enum mm_migrate_method m,
		     const struct mm_pause_ops *pause)
{
	memset(c, 0, sizeof(*c));
	if (m == MM_MIGRATE_AUTO)
		m = mm_migrate_have_wp(gm) ? MM_MIGRATE_WP : MM_MIGRATE_PAUSE;
	if (m == MM_MIGRATE_WP && !mm_migrate_have_wp(gm))
		return -EOPNOTSUPP;
	c->method = m;
	c->pause = pause;
	c->pause_budget_bytes = HPAGE_SIZE;
	return 0;
}

static void pause_stop(struct mm_migrate_ctx *c)
{
	if (!c->paused)
		return;
	if (c->pause && c->pause->resume)
		c->pause->resume(c->pause->opaque);
	uint64_t d = now_ns() - c->pause_t0;
	c->st.pauses++;
	c->st.pause_ns_total += d;
	if (d > c->st.pause_ns_max)
		c->st.pause_ns_max = d;
	c->paused = false;
	c->paused_bytes = 0;
}

static int pause_start(struct mm_migrate_ctx *c)
{
	if (c->paused)
		return 0;
	c->pause_t0 = now_ns();
	if (c->pause && c->pause->pause) {
		int rc = c->pause->pause(c->pause->opaque);
		if (rc)
			return rc;
	}
	c->paused = true;
	return 0;
}

void mm_migrate_end(struct guest_mem *gm, struct mm_migrate_ctx *c)
{
	pause_stop(c);
}

static int refusal(struct folio *f)
{
	uint32_t fl = atomic_load(&f->flags);
	if (fl & FOLIO_HWPOISON)
		return MM_MIGRATE_POISONED;
	if (fl & FOLIO_MIGRATING)
		return MM_MIGRATE_MIGRATING;
	if (fl & FOLIO_LOCKED)
		return MM_MIGRATE_LOCKED;
	if (fl & FOLIO_PINNED)
		return MM_MIGRATE_PINNED;
	return 0;
}

static void count_refusal(struct mm_migrate_stats *st, int rc)
{
	switch (rc) {
	case MM_MIGRATE_POISONED: st->refused_poisoned++; break;
	case MM_MIGRATE_LOCKED: st->refused_locked++; break;
	case MM_MIGRATE_PINNED: st->refused_pinned++; break;
	case MM_MIGRATE_MIGRATING: st->refused_migrating++; break;
	case MM_MIGRATE_BUSY: st->refused_busy++; break;
	default: break;
	}
}

/* Copy [at, at+len) to dst; under wp the range is write-protected first and
 * the writers are woken once `remap` has put the new location in place. */
static int copy_and_remap(struct guest_mem *gm, struct mm_migrate_ctx *c, uint32_t hpage,
			  unsigned piece, uint64_t gpa, uint64_t len, void *dst, int (*remap)(void *),
			  void *arg)
{
	uint64_t t0, t1;
	int rc = 0;
	if (c->method == MM_MIGRATE_WP) {
		/* Registered before the window opens (a registration splits
		 * VMAs); kept registered afterwards, so the next move of this
		 * region only write-protects. */
		for (uint64_t r = gpa >> 21; r <= (gpa + len - 1) >> 21 && !rc; r++)
			rc = region_arm(gm, r);
		if (rc)
			return rc;
	}
	t0 = now_ns();
	if (c->method == MM_MIGRATE_WP && (rc = uffd_wp_range(gm, gpa, len)))
		return rc;
	rc = folio_copy_out(gm, hpage, piece, gpa, len, dst);
	t1 = now_ns();
	if (!rc)
		rc = remap(arg);
	if (c->method == MM_MIGRATE_WP) {
		if (rc)
			uffd_unprotect_range(gm, gpa, len);   /* keep the old location */
		uffd_wake_range(gm, gpa, len);
		uint64_t d = now_ns() - t0;
		c->st.wp_ns_total += d;
		if (d > c->st.wp_ns_max)
			c->st.wp_ns_max = d;
	}
	c->st.copy_ns_total += t1 - t0;
	if (!rc)
		region_rearm(gm, gpa, len);   /* the new VMA: registered like its region */
	return rc;
}

struct fd_remap { struct guest_mem *gm; uint8_t *at; uint64_t len, off; };
static int fd_remap(void *arg)
{
	struct fd_remap *r = arg;
	if (mmap(r->at, r->len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, r->gm->pool.fd,
		 (off_t)r->off) == MAP_FAILED)
		return -errno;
	return 0;
}

struct anon_remap { uint8_t *n, *at; uint64_t len; };
static int anon_remap(void *arg)
{
	struct anon_remap *r = arg;
	if (mremap(r->n, r->len, r->len, MREMAP_MAYMOVE | MREMAP_FIXED, r->at) == MAP_FAILED)
		return -errno;
	return 0;
}

/* Under gm->lock, f frozen and MIGRATING. */
static int move_locked(struct guest_mem *gm, struct mm_migrate_ctx *c, struct folio *f, uint32_t dst)
{
	uint64_t gpa = f->gfn << MM_PAGE_SHIFT, len = folio_nr_pages(f) << MM_PAGE_SHIFT;
	uint8_t *at = gm->base + gpa;
	int rc;
	if (gm->pool.fd < 0) {
		/* Anonymous: fresh (THP-aligned) pages, copy, mremap over the GPA.
		 * The hugepage is the guest region itself: dst means nothing. */
		uint64_t al = len >= HPAGE_SIZE ? HPAGE_SIZE : MM_PAGE_SIZE;
		uint8_t *raw = mmap(NULL, len + al, PROT_READ | PROT_WRITE,
				    MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
		if (raw == MAP_FAILED)
			return -errno;
		uint8_t *n = (uint8_t *)(((uintptr_t)raw + al - 1) & ~(uintptr_t)(al - 1));
		if (n > raw)
			munmap(raw, (size_t)(n - raw));
		if (n + len < raw + len + al)
			munmap(n + len, (size_t)(raw + len + al - (n + len)));
		if (gm->backing == MM_BACKING_THP)
			madvise(n, len, MADV_HUGEPAGE);
		struct anon_remap r = { n, at, len };
		rc = copy_and_remap(gm, c, f->hpage, f->piece, gpa, len, n, anon_remap, &r);
		if (rc)
			munmap(n, len);
		return rc;
	}
	uint32_t old_hp = f->hpage;
	uint16_t old_piece = f->piece;
	bool dummy;
	if ((rc = pool_place(gm, f, dst, old_hp, &dummy))) {
		f->hpage = old_hp;
		f->piece = old_piece;
		return rc;
	}
	uint32_t new_hp = f->hpage;
	uint16_t new_piece = f->piece;
	uint64_t off = pool_offset(new_hp, new_piece);
	void *tmp = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, gm->pool.fd,
			 (off_t)off);
	if (tmp == MAP_FAILED) {
		rc = -errno;
		goto undo;
	}
	struct fd_remap r = { gm, at, len, off };
	rc = copy_and_remap(gm, c, old_hp, old_piece, gpa, len, tmp, fd_remap, &r);
	munmap(tmp, len);
	if (rc)
		goto undo;
	f->hpage = old_hp;         /* release the old pieces */
	f->piece = old_piece;
	pool_unplace(gm, f, true);
	f->hpage = new_hp;
	f->piece = new_piece;
	pool_update_owner(gm, f);
	if (gm->backing == MM_BACKING_HUGETLB)
		pool_hpage(&gm->pool, new_hp)->mapped = 1;
	return 0;
undo:
	pool_unplace(gm, f, true);
	f->hpage = old_hp;
	f->piece = old_piece;
	return rc;
}

int mm_migrate_folio(struct guest_mem *gm, struct mm_migrate_ctx *c, uint64_t gfn, uint32_t dst)
{
	int rc;
	/* Stop the vCPUs before taking gm->lock: a vCPU blocked in a
	 * first-touch fault needs the lock to get out of KVM_RUN. */
	if (c->method == MM_MIGRATE_PAUSE && (rc = pause_start(c)))
		return rc;
	pthread_mutex_lock(&gm->lock);
	memdesc_t md = mdt_get(&gm->md, gfn);
	struct folio *f = memdesc_folio(md);
	if (memdesc_type(md) == MEMDESC_POISONED)
		rc = MM_MIGRATE_POISONED;
	else if (!f)
		rc = -ENOENT;
	else if ((rc = refusal(f)))
		;
	else if (gm->backing == MM_BACKING_HUGETLB && (f->order < MM_MAX_ORDER || f->hpage == SIDE_HPAGE))
		rc = -EOPNOTSUPP;   /* demoted regions go back whole (collapse) */
	else if (folio_ref_freeze(f))
		rc = MM_MIGRATE_BUSY;
	else {
		uint64_t len = folio_nr_pages(f) << MM_PAGE_SHIFT;
		atomic_fetch_or(&f->flags, FOLIO_MIGRATING);
		rc = move_locked(gm, c, f, dst);
		atomic_fetch_and(&f->flags, ~(uint32_t)FOLIO_MIGRATING);
		folio_ref_unfreeze(f);
		if (!rc) {
			c->st.folios_moved++;
			c->st.bytes_moved += len;
			c->paused_bytes += len;
		}
	}
	pthread_mutex_unlock(&gm->lock);
	count_refusal(&c->st, rc);
	if (c->paused && c->paused_bytes >= c->pause_budget_bytes)
		pause_stop(c);
	return rc;
}

/* ---- hugetlb demotion / promotion */

/* Freeze every folio of region r (refusing as a move would); n of them. */
static int region_freeze(struct guest_mem *gm, uint64_t r, bool need_full, unsigned *n)
{
	uint64_t g0 = r << REGION_SHIFT, g;
	int rc = 0;
	*n = 0;
	for (g = g0; g < g0 + MM_REGION_PAGES;) {
		memdesc_t md = mdt_get(&gm->md, g);
		struct folio *f = memdesc_folio(md);
		if (memdesc_type(md) == MEMDESC_POISONED) {
			rc = MM_MIGRATE_POISONED;
			break;
		}
		if (!f) {
			if (need_full || !(md == 0 || memdesc_type(md) == MEMDESC_BALLOONED)) {
				rc = -EINVAL;
				break;
			}
			g++;
			continue;
		}
		if ((rc = refusal(f)))
			break;
		if (folio_ref_freeze(f)) {
			rc = MM_MIGRATE_BUSY;
			break;
		}
		atomic_fetch_or(&f->flags, FOLIO_MIGRATING);
		(*n)++;
		g = f->gfn + folio_nr_pages(f);
	}
	if (!rc)
		return 0;
	for (uint64_t u = g0; u < g;) {   /* thaw what was frozen */
		struct folio *f = memdesc_folio(mdt_get(&gm->md, u));
		if (!f) {
			u++;
			continue;
		}
		atomic_fetch_and(&f->flags, ~(uint32_t)FOLIO_MIGRATING);
		folio_ref_unfreeze(f);
		u = f->gfn + folio_nr_pages(f);
	}
	return rc;
}

static void region_thaw(struct guest_mem *gm, uint64_t r)
{
	uint64_t g0 = r << REGION_SHIFT;
	for (uint64_t g = g0; g < g0 + MM_REGION_PAGES;) {
		struct folio *f = memdesc_folio(mdt_get(&gm->md, g));
		if (!f) {
			g++;
			continue;
		}
		atomic_fetch_and(&f->flags, ~(uint32_t)FOLIO_MIGRATING);
		folio_ref_unfreeze(f);
		g = f->gfn + folio_nr_pages(f);
	}
}

static void window_end(struct guest_mem *gm, struct mm_migrate_ctx *c, uint64_t gpa, uint64_t t0)
{
	if (c->method != MM_MIGRATE_WP)
		return;
	uffd_wake_range(gm, gpa, HPAGE_SIZE);
	uint64_t d = now_ns() - t0;
	c->st.wp_ns_total += d;
	if (d > c->st.wp_ns_max)
		c->st.wp_ns_max = d;
}

/* skip: a frame whose data must not be read (memory failure), left a hole
 * of the side file; UINT64_MAX for none. */
static int demote_locked(struct guest_mem *gm, struct mm_migrate_ctx *c, uint64_t r, uint64_t skip,
			 uint64_t *copied)
{
	uint64_t gpa = r << HPAGE_SHIFT, g0 = r << REGION_SHIFT;
	uint32_t idx;
	struct hpage *h = pool_region_home(gm, r, &idx);
	int rc;
	if (gm->pool.side_fd < 0 || (region_flags(gm, r) & REGION_DEMOTED) || !h || !h->mapped ||
	    h->nr_bad || h->region != r || !h->nr_used)
		return -EINVAL;
	if ((rc = region_arm(gm, r)))
		return rc;
	/* The live runs (adjacent folios merged; the skipped frame cut out). */
	uint16_t run_lo[MM_REGION_PAGES / 2 + 1], run_hi[MM_REGION_PAGES / 2 + 1];
	unsigned nruns = 0;
	for (uint64_t g = g0; g < g0 + MM_REGION_PAGES;) {
		struct folio *f = memdesc_folio(mdt_get(&gm->md, g));
		if (!f || g == skip) {
			g++;
			continue;
		}
		uint64_t e = f->gfn + folio_nr_pages(f);
		for (struct folio *n; e < g0 + MM_REGION_PAGES && (n = memdesc_folio(mdt_get(&gm->md, e)));)
			e = n->gfn + folio_nr_pages(n);
		if (skip > g && skip < e)
			e = skip;
		run_lo[nruns] = (uint16_t)(g - g0);
		run_hi[nruns++] = (uint16_t)(e - g0);
		g = e;
	}
	/* The side file's pages for them, allocated and mapped before the
	 * window: inside it only memcpy runs (a pwrite per 4 KiB run, which
	 * also allocated, made scattered regions' windows ~2 ms). */
	uint8_t *tmp = mmap(NULL, HPAGE_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, gm->pool.side_fd,
			    (off_t)gpa);
	if (tmp == MAP_FAILED)
		return -errno;
	for (unsigned i = 0; i < nruns; i++)
		madvise(tmp + ((uint64_t)run_lo[i] << MM_PAGE_SHIFT),
			(uint64_t)(run_hi[i] - run_lo[i]) << MM_PAGE_SHIFT, MADV_POPULATE_WRITE);
	uint64_t t0 = now_ns();
	if (c->method == MM_MIGRATE_WP && (rc = uffd_wp_range(gm, gpa, HPAGE_SIZE))) {
		munmap(tmp, HPAGE_SIZE);
		fallocate(gm->pool.side_fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)gpa,
			  (off_t)HPAGE_SIZE);
		return rc;
	}
	/* Live pages to their colour in the side file (the hugetlb page is
	 * mapped whole: reading it never faults). */
	*copied = 0;
	for (unsigned i = 0; i < nruns; i++) {
		uint64_t off = (uint64_t)run_lo[i] << MM_PAGE_SHIFT;
		uint64_t len = (uint64_t)(run_hi[i] - run_lo[i]) << MM_PAGE_SHIFT;
		memcpy(tmp + off, gm->base + gpa + off, len);
		*copied += len;
	}
	if (mmap(gm->base + gpa, HPAGE_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED,
		 gm->pool.side_fd, (off_t)gpa) == MAP_FAILED)
		rc = -errno;
	if (rc) {
		munmap(tmp, HPAGE_SIZE);
		fallocate(gm->pool.side_fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)gpa,
			  (off_t)HPAGE_SIZE);
		if (c->method == MM_MIGRATE_WP)
			uffd_unprotect_range(gm, gpa, HPAGE_SIZE);
		window_end(gm, c, gpa, t0);
		return rc;
	}
	window_end(gm, c, gpa, t0);
	/* After the wake: the hugetlb page is no longer mapped, and neither
	 * the unmap of the copy's mapping (the pages stay in the file), the
	 * registration nor the punch needs the writers to wait. */
	munmap(tmp, HPAGE_SIZE);
	region_rearm(gm, gpa, HPAGE_SIZE);
	pool_demote_region(gm, r);   /* gives the hugetlb page back */
	/* A vCPU that touched a free page between the mmap and the
	 * registration got a page of the side file behind mm/'s back: adopt it
	 * (a deflate, as a touch of a ballooned page is). */
	for (off_t o = (off_t)gpa; o < (off_t)(gpa + HPAGE_SIZE);) {
		off_t d = lseek(gm->pool.side_fd, o, SEEK_DATA);
		if (d < 0 || d >= (off_t)(gpa + HPAGE_SIZE))
			break;
		off_t e = lseek(gm->pool.side_fd, d, SEEK_HOLE);
		if (e < 0 || e > (off_t)(gpa + HPAGE_SIZE))
			e = (off_t)(gpa + HPAGE_SIZE);
		for (uint64_t g = (uint64_t)d >> MM_PAGE_SHIFT; g < (uint64_t)e >> MM_PAGE_SHIFT; g++)
			if (!memdesc_folio(mdt_get(&gm->md, g)))
				populate_locked(gm, g, 1, 0, MEMDESC_FOLIO);
		o = e;
	}
	return 0;
}

static int promote_locked(struct guest_mem *gm, struct mm_migrate_ctx *c, uint64_t r);

/* Demote or promote one region with its folios frozen: the bookkeeping both
 * share (pause budget, lock, counters). */
static int region_convert(struct guest_mem *gm, struct mm_migrate_ctx *c, uint64_t region, bool promote)
{
	int rc;
	unsigned n;
	uint64_t bytes = 0;
	if (gm->backing != MM_BACKING_HUGETLB || region >= gm->md.nregions)
		return -EINVAL;
	if (c->method == MM_MIGRATE_PAUSE && (rc = pause_start(c)))
		return rc;
	pthread_mutex_lock(&gm->lock);
	if (!(rc = region_freeze(gm, region, promote, &n))) {
		if (promote) {
			rc = promote_locked(gm, c, region);
			bytes = HPAGE_SIZE;   /* the whole region is copied back */
		} else {
			rc = demote_locked(gm, c, region, UINT64_MAX, &bytes);   /* live runs only */
		}
		region_thaw(gm, region);
		if (!rc) {
			if (promote)
				c->st.regions_promoted++;
			else
				c->st.regions_demoted++;
			c->st.folios_moved += n;
			c->st.bytes_moved += bytes;
			c->paused_bytes += bytes;
		}
	}
	pthread_mutex_unlock(&gm->lock);
	count_refusal(&c->st, rc);
	if (c->paused && c->paused_bytes >= c->pause_budget_bytes)
		pause_stop(c);
	return rc;
}

int mm_demote_region(struct guest_mem *gm, struct mm_migrate_ctx *c, uint64_t region)
{
	return region_convert(gm, c, region, false);
}

int demote_for_failure_locked(struct guest_mem *gm, uint64_t gfn)
{
	struct mm_migrate_ctx c;
	uint64_t r = gfn >> REGION_SHIFT, copied;
	unsigned n;
	int rc;
	/* Write protection keeps the copy consistent with vCPUs running; mm/
	 * has no way to stop them from here. */
	if (gm->backing != MM_BACKING_HUGETLB || !mm_migrate_have_wp(gm))
		return -EOPNOTSUPP;
	memset(&c, 0, sizeof(c));
	c.method = MM_MIGRATE_WP;
	if (!(rc = region_freeze(gm, r, false, &n))) {
		rc = demote_locked(gm, &c, r, gfn, &copied);
		region_thaw(gm, r);
	}
	return rc;
}

static int promote_locked(struct guest_mem *gm, struct mm_migrate_ctx *c, uint64_t r)
{
	uint64_t gpa = r << HPAGE_SHIFT;
	uint32_t idx;
	int rc;
	if (!(region_flags(gm, r) & REGION_DEMOTED))
		return -EINVAL;
	if ((rc = pool_hpage_new(gm, &idx)))
		return rc;
	uint8_t *tmp = mmap(NULL, HPAGE_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, gm->pool.fd,
			    (off_t)pool_offset(idx, 0));
	if (tmp == MAP_FAILED) {
		rc = -errno;
		pool_hpage_drop(gm, idx);
		return rc;
	}
	if ((rc = region_arm(gm, r)))
		goto out;
	uint64_t t0 = now_ns();
	if (c->method == MM_MIGRATE_WP && (rc = uffd_wp_range(gm, gpa, HPAGE_SIZE)))
		goto out;
	/* From the side file (holes read as zero, no fault). */
	for (uint64_t done = 0; done < HPAGE_SIZE && !rc;) {
		ssize_t n = pread(gm->pool.side_fd, tmp + done, HPAGE_SIZE - done, (off_t)(gpa + done));
		if (n <= 0)
			rc = n < 0 ? -errno : -EIO;
		else
			done += (uint64_t)n;
	}
	if (!rc && mmap(gm->base + gpa, HPAGE_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED,
			gm->pool.fd, (off_t)pool_offset(idx, 0)) == MAP_FAILED)
		rc = -errno;
	if (rc) {
		if (c->method == MM_MIGRATE_WP)
			uffd_unprotect_range(gm, gpa, HPAGE_SIZE);
		window_end(gm, c, gpa, t0);
		goto out;
	}
	window_end(gm, c, gpa, t0);
	region_rearm(gm, gpa, HPAGE_SIZE);
	pool_promote_region(gm, r, idx);   /* punches the side pages */
out:
	munmap(tmp, HPAGE_SIZE);
	if (rc)
		pool_hpage_drop(gm, idx);
	return rc;
}

int mm_promote_region(struct guest_mem *gm, struct mm_migrate_ctx *c, uint64_t region)
{
	return region_convert(gm, c, region, true);
}
