/*
 * randread: 4 KiB random-read IOPS on a block device, for ci/bench/io.py.
 *
 *   randread [-s] [-w] [-n COUNT] [-t SECONDS] [-b BYTES] DEVICE
 *
 * Reads BYTES (default 4096, a multiple of 512) at pseudo-random BYTES-aligned offsets
 * of DEVICE with O_DIRECT, so every read reaches the virtual disk instead of the guest's
 * page cache, one at a time (queue depth 1: the latency of one request is what is
 * measured). Stops after COUNT reads or SECONDS seconds, whichever comes first (defaults:
 * no count, 10 seconds; -t 0 is no time limit), and prints one line:
 *
 *   randread: N reads of B bytes in S s: I IOPS, M MiB/s
 *
 * -s reads sequentially instead (offset 0, B, 2B, ..., wrapping at the end of DEVICE)
 * and -w writes a fixed pattern instead of reading ("N writes"): the sequential
 * throughput benchmark uses "-s -b 1048576" and "-s -w -b 1048576". busybox dd would do,
 * but its write source /dev/zero costs the guest kernel more than the disk does (one
 * cleared byte range per block, emulated instruction by instruction on PVM hosts), and
 * dd cannot time itself without the fork and exec around it.
 *
 * The random offsets come from a fixed-seed xorshift generator, so two runs read the
 * same blocks in the same order. Exit status 0; 1 with a message on stderr on an error;
 * 2 for bad usage.
 *
 * Built static by vmsh/images/guest_tools.py (musl-gcc -static -Os) into the initramfs
 * as /bin/randread. The guest kernel is slow on some hosts (every kernel instruction
 * emulated), so the loop makes one pread per read and looks at the clock only every 16
 * small reads (clock_gettime goes through the vDSO, but is still not free).
 */
#define _GNU_SOURCE /* O_DIRECT */
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

/* O_DIRECT wants the buffer aligned to the logical block size; a page covers every disk */
#define MAX_BLOCK (1 << 20)
static char buf[MAX_BLOCK] __attribute__((aligned(4096)));

static void die(const char *what)
{
	fprintf(stderr, "randread: %s: %s\n", what, strerror(errno));
	exit(1);
}

static void usage(void)
{
	fprintf(stderr, "usage: randread [-s] [-w] [-n COUNT] [-t SECONDS] [-b BYTES] DEVICE\n");
	exit(2);
}

static unsigned long number(const char *text)
{
	char *end;
	unsigned long value;

	errno = 0;
	value = strtoul(text, &end, 0);
	if (errno || end == text || *end)
		usage();
	return value;
}

static double now(void)
{
	struct timespec ts;

	if (clock_gettime(CLOCK_MONOTONIC, &ts) < 0)
		die("clock_gettime");
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* xorshift64: good enough to scatter offsets, and the same sequence every run */
static uint64_t next_random(uint64_t *state)
{
	uint64_t x = *state;

	x ^= x << 13;
	x ^= x >> 7;
	x ^= x << 17;
	*state = x;
	return x;
}

int main(int argc, char **argv)
{
	unsigned long count = 0, seconds = 10, block = 4096, done;
	uint64_t state = 0x9e3779b97f4a7c15ULL, blocks;
	double start, elapsed = 0;
	int opt, fd, sequential = 0, write_mode = 0;
	off_t size;

	while ((opt = getopt(argc, argv, "swn:t:b:")) != -1) {
		if (opt == 's')
			sequential = 1;
		else if (opt == 'w')
			write_mode = 1;
		else if (opt == 'n')
			count = number(optarg);
		else if (opt == 't')
			seconds = number(optarg);
		else if (opt == 'b')
			block = number(optarg);
		else
			usage();
	}
	if (optind != argc - 1 || block == 0 || block % 512 || block > MAX_BLOCK || (count == 0 && seconds == 0))
		usage();
	fd = open(argv[optind], (write_mode ? O_WRONLY : O_RDONLY) | O_DIRECT);
	if (fd < 0)
		die(argv[optind]);
	/* a block device's size; lseek works where stat's st_size is 0 */
	size = lseek(fd, 0, SEEK_END);
	if (size < 0)
		die("lseek");
	blocks = (uint64_t)size / block;
	if (blocks == 0) {
		fprintf(stderr, "randread: %s is smaller than one block\n", argv[optind]);
		return 1;
	}
	/* not zeros, so nothing along the way can treat the writes as holes */
	if (write_mode)
		memset(buf, 0xa5, block);
	start = now();
	for (done = 0; count == 0 || done < count; done++) {
		uint64_t index = sequential ? done % blocks : next_random(&state) % blocks;
		off_t offset = (off_t)(index * block);
		ssize_t n = write_mode ? pwrite(fd, buf, block, offset) : pread(fd, buf, block, offset);

		if (n < 0)
			die(write_mode ? "pwrite" : "pread");
		if ((unsigned long)n != block) {
			fprintf(stderr, "randread: short %s at %lld\n", write_mode ? "write" : "read",
				(long long)offset);
			return 1;
		}
		/* large blocks take long enough that looking at the clock each time costs nothing */
		if (seconds && (block >= 65536 || done % 16 == 15)) {
			elapsed = now() - start;
			if (elapsed >= (double)seconds) {
				done++;
				break;
			}
		}
	}
	/* O_DIRECT writes may still sit in the disk's write cache: the time includes the flush */
	if (write_mode && fsync(fd) < 0)
		die("fsync");
	elapsed = now() - start;
	printf("randread: %lu %s of %lu bytes in %.3f s: %.0f IOPS, %.2f MiB/s\n", done,
	       write_mode ? "writes" : "reads", block, elapsed, (double)done / elapsed,
	       (double)done * (double)block / elapsed / (1 << 20));
	return 0;
}
