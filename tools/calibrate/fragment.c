/*
 * fragment.c - make the gemfs fragmentation pattern inside a real Linux guest.
 *
 * Part of `gemfs calibrate`: tools/calibrate/guest.py builds this file with
 * `gcc -static -O2`, puts it in a tiny initramfs and runs it once per scenario
 * inside a QEMU guest.  It never runs on the host.
 *
 * What it does, in order:
 *   1. reads MemFree from /proc/meminfo and maps anonymous chunks of
 *      CHUNK bytes (transparent huge pages disabled, so every chunk is made
 *      of 4 KiB pages) until FILL x MemFree bytes are populated;
 *   2. reads the chunks' physical frame numbers from /proc/self/pagemap and
 *      reports where the chunk stream starts within a 2 MiB pageblock (the
 *      phase: the most common (pfn(chunk i) - i x chunk pages) mod 512) and
 *      how many chunks are physically contiguous;
 *   3. unmaps the chunks the free rhythm selects (-F, default "01": every
 *      other chunk, odd indices), leaving ~chunk-sized holes;
 *   4. long-term pins the survivors the pin rhythm selects by registering
 *      them as io_uring fixed buffers (pin_user_pages(FOLL_WRITE |
 *      FOLL_LONGTERM) in the kernel, the same kind of pin a GPU driver
 *      takes): -p none|all|half, or a rhythm over survivors with -P ("10":
 *      every other survivor, as half);
 *   4. dumps /proc/buddyinfo, /proc/pagetypeinfo and selected /proc/vmstat
 *      counters ("before"), writes 1 to /proc/sys/vm/compact_memory unless
 *      -N is given, dumps them again ("after");
 *   5. asks for far more huge pages than can exist through
 *      /proc/sys/vm/nr_hugepages, reads back how many the kernel found, and
 *      releases them (writes 0);
 *   6. unregisters the buffers, closes the rings and unmaps everything.
 *
 * The hugepage probe runs only once, after the "after" dump: writing
 * nr_hugepages makes the allocator reclaim and compact on its own, so a
 * probe before compact_memory would change the state it is meant to measure.
 * To see what the allocator alone can do, run with -N (no explicit
 * compaction); the probe then follows the "before" state directly.
 *
 * Output goes to stdout between marker lines the host parses:
 *   @@GEMFS-BEGIN <section>
 *   ...raw text...
 *   @@GEMFS-END <section>
 * and finally "@@GEMFS-DONE <name>".  Errors go to stderr as
 * "@@GEMFS-ERROR <name>: <message>" and the exit status is non-zero.
 *
 * A rhythm is a string of 0 and 1 applied to indices modulo its length.
 *
 * Usage: fragment -n NAME -c CHUNK_KIB -f FILL -p none|all|half [-F FREE]
 *                 [-P PIN] [-N] [-H COUNT]
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#ifndef __NR_io_uring_setup
#define __NR_io_uring_setup 425
#endif
#ifndef __NR_io_uring_register
#define __NR_io_uring_register 427
#endif

/* From <linux/io_uring.h>; spelled out so only libc headers are needed. */
#define GEMFS_IORING_REGISTER_BUFFERS 0
#define GEMFS_IORING_UNREGISTER_BUFFERS 1
/* Kernel limits for one buffer table: at most 1 << 14 iovecs, each <= 1 GiB.
 * A ring holds one table, so more chunks than that need more rings. */
#define GEMFS_MAX_BUFS_PER_RING 16384u
#define GEMFS_MAX_IOV_LEN (1ul << 30)

/* struct io_uring_params is 120 bytes; only its size and zeroed contents
 * matter here (entries/flags in, offsets out, which are not used). */
struct gemfs_uring_params {
	uint32_t words[30];
};

#define PAGE_BYTES 4096ul

static const char *g_name = "fragment";

static void fail(const char *fmt, ...)
{
	va_list ap;

	fflush(stdout);
	fprintf(stderr, "@@GEMFS-ERROR %s: ", g_name);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
	exit(1);
}

static double now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

static void begin(const char *section)
{
	printf("@@GEMFS-BEGIN %s\n", section);
}

static void end(const char *section)
{
	printf("@@GEMFS-END %s\n", section);
	fflush(stdout);
}

/* Value of one "Key:  N kB" line of /proc/meminfo, in kB; -1 if absent. */
static long meminfo_kb(const char *key)
{
	char line[256];
	size_t klen = strlen(key);
	long value = -1;
	FILE *f = fopen("/proc/meminfo", "r");

	if (!f)
		fail("cannot open /proc/meminfo: %s", strerror(errno));
	while (fgets(line, sizeof(line), f)) {
		if (strncmp(line, key, klen) == 0 && line[klen] == ':') {
			value = strtol(line + klen + 1, NULL, 10);
			break;
		}
	}
	fclose(f);
	return value;
}

/* Copy a /proc file to stdout; keep only lines starting with one of
 * `prefixes` when that list is given. */
static void dump_file(const char *path, const char *const *prefixes)
{
	char line[1024];
	FILE *f = fopen(path, "r");

	if (!f)
		fail("cannot open %s: %s", path, strerror(errno));
	while (fgets(line, sizeof(line), f)) {
		int keep = prefixes == NULL;

		for (const char *const *p = prefixes; !keep && p && *p; p++)
			keep = strncmp(line, *p, strlen(*p)) == 0;
		if (keep)
			fputs(line, stdout);
	}
	fclose(f);
}

static const char *const VMSTAT_KEYS[] = {
	"nr_free_pages ", "compact_", "pgmigrate_", "thp_", "nr_anon_pages ",
	"htlb_", NULL,
};

static void dump_state(const char *phase)
{
	char section[64];

	snprintf(section, sizeof(section), "buddyinfo.%s", phase);
	begin(section);
	dump_file("/proc/buddyinfo", NULL);
	end(section);

	snprintf(section, sizeof(section), "pagetypeinfo.%s", phase);
	begin(section);
	dump_file("/proc/pagetypeinfo", NULL);
	end(section);

	snprintf(section, sizeof(section), "vmstat.%s", phase);
	begin(section);
	dump_file("/proc/vmstat", VMSTAT_KEYS);
	end(section);

	snprintf(section, sizeof(section), "meminfo.%s", phase);
	begin(section);
	printf("MemFree %ld\nMemAvailable %ld\n", meminfo_kb("MemFree"),
	       meminfo_kb("MemAvailable"));
	end(section);
}

static void write_proc(const char *path, const char *text)
{
	int fd = open(path, O_WRONLY);

	if (fd < 0)
		fail("cannot open %s: %s", path, strerror(errno));
	if (write(fd, text, strlen(text)) < 0)
		fail("cannot write %s to %s: %s", text, path, strerror(errno));
	close(fd);
}

static long read_proc_long(const char *path)
{
	char buf[64] = { 0 };
	int fd = open(path, O_RDONLY);
	ssize_t n;

	if (fd < 0)
		fail("cannot open %s: %s", path, strerror(errno));
	n = read(fd, buf, sizeof(buf) - 1);
	close(fd);
	if (n <= 0)
		fail("cannot read %s", path);
	return strtol(buf, NULL, 10);
}

/* Register `n` chunks as fixed buffers, spread over as many rings as the
 * per-ring limit needs.  Returns the number of rings; fds go to `rings`. */
static size_t pin_chunks(struct iovec *iov, size_t n, int *rings)
{
	size_t nrings = 0;

	for (size_t off = 0; off < n; off += GEMFS_MAX_BUFS_PER_RING) {
		size_t batch = n - off;
		struct gemfs_uring_params params;
		long fd, ret;

		if (batch > GEMFS_MAX_BUFS_PER_RING)
			batch = GEMFS_MAX_BUFS_PER_RING;
		memset(&params, 0, sizeof(params));
		fd = syscall(__NR_io_uring_setup, 1u, &params);
		if (fd < 0)
			fail("io_uring_setup: %s", strerror(errno));
		ret = syscall(__NR_io_uring_register, (unsigned int)fd,
			      GEMFS_IORING_REGISTER_BUFFERS, iov + off,
			      (unsigned int)batch);
		if (ret < 0)
			fail("io_uring_register(IORING_REGISTER_BUFFERS, %zu): %s",
			     batch, strerror(errno));
		rings[nrings++] = (int)fd;
	}
	return nrings;
}

static void unpin_all(int *rings, size_t nrings)
{
	for (size_t i = 0; i < nrings; i++) {
		if (syscall(__NR_io_uring_register, (unsigned int)rings[i],
			    GEMFS_IORING_UNREGISTER_BUFFERS, NULL, 0u) < 0)
			fail("io_uring_register(IORING_UNREGISTER_BUFFERS): %s",
			     strerror(errno));
		close(rings[i]);
	}
}

static void usage(void)
{
	fprintf(stderr, "usage: fragment -n NAME -c CHUNK_KIB -f FILL "
			"-p none|all|half [-F FREE] [-P PIN] [-N] [-H HUGEPAGES]\n");
	exit(2);
}

static int rhythm_ok(const char *r)
{
	if (!*r || strlen(r) > 64)
		return 0;
	for (; *r; r++)
		if (*r != '0' && *r != '1')
			return 0;
	return 1;
}

static int rhythm_at(const char *r, size_t i)
{
	return r[i % strlen(r)] == '1';
}

#define PAGEBLOCK_PAGES 512ul
#define PFN_MASK ((1ull << 55) - 1)
#define PFN_PRESENT (1ull << 63)

/* The chunk stream's phase in its pageblock, read from /proc/self/pagemap. */
static void report_phase(char **chunks, size_t n, size_t chunk)
{
	size_t pages = chunk / PAGE_BYTES;
	uint64_t *ent = malloc(pages * sizeof(*ent));
	unsigned long votes[PAGEBLOCK_PAGES] = { 0 };
	size_t read_ok = 0, contiguous = 0;
	int fd = open("/proc/self/pagemap", O_RDONLY);
	if (fd < 0 || !ent) {
		fprintf(stderr, "@@GEMFS-WARN %s: pagemap: %s\n", g_name,
			strerror(errno));
		if (fd >= 0)
			close(fd);
		free(ent);
		return;
	}
	for (size_t i = 0; i < n; i++) {
		off_t off = (off_t)((uintptr_t)chunks[i] / PAGE_BYTES) * 8;
		ssize_t want = (ssize_t)(pages * sizeof(*ent));
		if (pread(fd, ent, (size_t)want, off) != want)
			continue;
		if (!(ent[0] & PFN_PRESENT) || !(ent[0] & PFN_MASK))
			continue; /* no PFNs without CAP_SYS_ADMIN */
		read_ok++;
		uint64_t first = ent[0] & PFN_MASK;
		size_t j = 1;
		while (j < pages && (ent[j] & PFN_MASK) == first + j)
			j++;
		contiguous += j == pages;
		uint64_t phase = (first + PAGEBLOCK_PAGES * 1000000ull -
				  (uint64_t)(i * pages) % PAGEBLOCK_PAGES) %
				 PAGEBLOCK_PAGES;
		votes[phase]++;
	}
	close(fd);
	free(ent);
	size_t best = 0;
	for (size_t k = 1; k < PAGEBLOCK_PAGES; k++)
		if (votes[k] > votes[best])
			best = k;
	begin("phase");
	if (read_ok)
		printf("phase_pages %zu\nphase_chunks %lu\n", best, votes[best]);
	printf("chunks_read %zu\ncontiguous_chunks %zu\n", read_ok, contiguous);
	end("phase");
}

int main(int argc, char **argv)
{
	unsigned long chunk_kib = 1024;
	double fill = 0.8;
	const char *pin = "none";
	const char *free_rhythm = "01";
	const char *pin_rhythm = NULL;
	int compact = 1;
	long huge_request = -1;
	int opt;

	while ((opt = getopt(argc, argv, "n:c:f:p:F:P:NH:")) != -1) {
		switch (opt) {
		case 'n': g_name = optarg; break;
		case 'c': chunk_kib = strtoul(optarg, NULL, 10); break;
		case 'f': fill = strtod(optarg, NULL); break;
		case 'p': pin = optarg; break;
		case 'F': free_rhythm = optarg; break;
		case 'P': pin_rhythm = optarg; break;
		case 'N': compact = 0; break;
		case 'H': huge_request = strtol(optarg, NULL, 10); break;
		default: usage();
		}
	}
	if (chunk_kib < 4 || chunk_kib % 4 || chunk_kib * 1024ul > GEMFS_MAX_IOV_LEN)
		fail("chunk size must be a multiple of 4 KiB and at most 1 GiB");
	if (!(fill > 0.0 && fill < 1.0))
		fail("fill fraction must be in (0, 1)");
	int pin_mode; /* 0 none, 1 all, 2 half */
	if (strcmp(pin, "none") == 0)
		pin_mode = 0;
	else if (strcmp(pin, "all") == 0)
		pin_mode = 1;
	else if (strcmp(pin, "half") == 0)
		pin_mode = 2;
	else
		fail("pin mode must be none, all or half, not %s", pin);
	if (!pin_rhythm)
		pin_rhythm = pin_mode == 0 ? "0" : pin_mode == 1 ? "1" : "10";
	if (!rhythm_ok(free_rhythm) || !rhythm_ok(pin_rhythm))
		fail("rhythms are 1 to 64 characters of 0 and 1");

	setvbuf(stdout, NULL, _IOFBF, 1 << 16);

	/* Chunks must be built of 4 KiB pages, as the model's are. */
	if (prctl(PR_SET_THP_DISABLE, 1, 0, 0, 0) != 0)
		fail("prctl(PR_SET_THP_DISABLE): %s", strerror(errno));
	/* Root with CAP_IPC_LOCK is not charged for pins, but lift the limit
	 * anyway in case the kernel accounts them. */
	struct rlimit unlimited = { RLIM_INFINITY, RLIM_INFINITY };
	if (setrlimit(RLIMIT_MEMLOCK, &unlimited) != 0)
		fprintf(stderr, "@@GEMFS-WARN %s: setrlimit(RLIMIT_MEMLOCK): %s\n",
			g_name, strerror(errno));

	size_t chunk = chunk_kib * 1024ul;
	long memfree_kb = meminfo_kb("MemFree");
	long memavail_kb = meminfo_kb("MemAvailable");
	long memtotal_kb = meminfo_kb("MemTotal");
	if (memfree_kb <= 0)
		fail("no MemFree in /proc/meminfo");
	size_t target = (size_t)((double)memfree_kb * 1024.0 * fill);
	size_t nchunks = target / chunk;
	if (nchunks < 4)
		fail("only %zu chunks fit in %.0f%% of %ld kB free", nchunks,
		     fill * 100, memfree_kb);

	begin("params");
	printf("name %s\nchunk_bytes %zu\nfill %.4f\npin %s\nfree_rhythm %s\n"
	       "pin_rhythm %s\ncompact %d\nMemTotal %ld\nMemFree %ld\n"
	       "MemAvailable %ld\n",
	       g_name, chunk, fill, pin, free_rhythm, pin_rhythm, compact,
	       memtotal_kb, memfree_kb, memavail_kb);
	end("params");

	char **chunks = calloc(nchunks, sizeof(*chunks));
	struct iovec *iov = calloc(nchunks, sizeof(*iov));
	int *rings = calloc(nchunks / GEMFS_MAX_BUFS_PER_RING + 2, sizeof(*rings));
	if (!chunks || !iov || !rings)
		fail("out of memory for bookkeeping");

	/* 1. Fill. */
	double t0 = now_ms();
	size_t allocated = 0;
	for (size_t i = 0; i < nchunks; i++) {
		char *p = mmap(NULL, chunk, PROT_READ | PROT_WRITE,
			       MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
		if (p == MAP_FAILED)
			break;
		/* Before the first touch, so no fault can map a huge page. */
		madvise(p, chunk, MADV_NOHUGEPAGE);
		for (size_t off = 0; off < chunk; off += PAGE_BYTES)
			p[off] = (char)(i + off / PAGE_BYTES + 1);
		chunks[i] = p;
		allocated++;
	}
	double t_fill = now_ms() - t0;
	if (allocated < 4)
		fail("could map only %zu chunks", allocated);

	report_phase(chunks, allocated, chunk);

	/* 3. Free the chunks the free rhythm selects. */
	size_t freed = 0;
	for (size_t i = 0; i < allocated; i++) {
		if (!rhythm_at(free_rhythm, i))
			continue;
		if (munmap(chunks[i], chunk) != 0)
			fail("munmap: %s", strerror(errno));
		chunks[i] = NULL;
		freed++;
	}

	/* 4. Pin the survivors the pin rhythm selects (counted over survivors:
	 * "10" pins indices 0, 4, 8, ... when every other chunk was freed). */
	size_t npin = 0, survivor = 0;
	for (size_t i = 0; i < allocated; i++) {
		if (!chunks[i])
			continue;
		if (rhythm_at(pin_rhythm, survivor++)) {
			iov[npin].iov_base = chunks[i];
			iov[npin].iov_len = chunk;
			npin++;
		}
	}
	t0 = now_ms();
	size_t nrings = npin ? pin_chunks(iov, npin, rings) : 0;
	double t_pin = now_ms() - t0;

	begin("chunks");
	printf("requested %zu\nallocated %zu\nfreed %zu\nkept %zu\npinned %zu\n"
	       "pinned_bytes %zu\nrings %zu\nfill_ms %.1f\npin_ms %.1f\n",
	       nchunks, allocated, freed, allocated - freed, npin, npin * chunk,
	       nrings, t_fill, t_pin);
	end("chunks");

	/* 5. Before, compact, after. */
	dump_state("before");
	double t_compact = 0.0;
	if (compact) {
		t0 = now_ms();
		write_proc("/proc/sys/vm/compact_memory", "1\n");
		t_compact = now_ms() - t0;
	}
	begin("compact");
	printf("done %d\nms %.1f\n", compact, t_compact);
	end("compact");
	dump_state("after");

	/* 6. Hugepage probe: ask for more than could ever exist. */
	if (huge_request < 0)
		huge_request = memtotal_kb / 2048 + 64;
	char text[32];
	snprintf(text, sizeof(text), "%ld\n", huge_request);
	t0 = now_ms();
	write_proc("/proc/sys/vm/nr_hugepages", text);
	double t_huge = now_ms() - t0;
	long obtained = read_proc_long("/proc/sys/vm/nr_hugepages");
	write_proc("/proc/sys/vm/nr_hugepages", "0\n");
	begin("hugepages");
	printf("requested %ld\nobtained %ld\nms %.1f\nleft %ld\n", huge_request,
	       obtained, t_huge, read_proc_long("/proc/sys/vm/nr_hugepages"));
	end("hugepages");

	/* 7. Give everything back before the next scenario. */
	unpin_all(rings, nrings);
	for (size_t i = 0; i < allocated; i++)
		if (chunks[i])
			munmap(chunks[i], chunk);
	printf("@@GEMFS-DONE %s\n", g_name);
	fflush(stdout);
	return 0;
}
