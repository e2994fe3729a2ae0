/* N pread() calls of 4 KiB at random page offsets of a file held in the page cache; prints the mean
 * nanoseconds per call. Each call is one page-cache lookup and one file read system call: the event
 * cachestat, vfsstat and filetop each count.
 *
 *   pread_loop FILE N
 */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

int main(int argc, char **argv)
{
	static char buf[4096];
	struct timespec a, b;
	struct stat st;
	long n, pages;
	unsigned int seed = 1;
	int fd;

	if (argc != 3) {
		fprintf(stderr, "usage: %s FILE N\n", argv[0]);
		return 2;
	}
	fd = open(argv[1], O_RDONLY);
	if (fd < 0 || fstat(fd, &st) < 0) {
		perror(argv[1]);
		return 1;
	}
	n = atol(argv[2]);
	pages = st.st_size / 4096;
	clock_gettime(CLOCK_MONOTONIC, &a);
	for (long i = 0; i < n; i++) {
		if (pread(fd, buf, sizeof(buf), (off_t)(rand_r(&seed) % pages) * 4096) != sizeof(buf)) {
			perror("pread");
			return 1;
		}
	}
	clock_gettime(CLOCK_MONOTONIC, &b);
	printf("%.2f\n", ((b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec)) / n);
	return 0;
}
