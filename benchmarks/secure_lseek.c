/* Syscall storm for `bpfscope secure`: N lseek() calls, one in EVERY with the offset the policy matches
 * (777), the others with offset 0; prints the mean ns per call and how many calls matched. */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

int main(int argc, char **argv)
{
	long n = argc > 1 ? atol(argv[1]) : 10000000, every = argc > 2 ? atol(argv[2]) : 1000;
	int fd = open("/dev/null", O_RDONLY);
	struct timespec a, b;
	long matched = 0;

	clock_gettime(CLOCK_MONOTONIC, &a);
	for (long i = 0; i < n; i++) {
		int match = i % every == every - 1;

		lseek(fd, match ? 777 : 0, SEEK_SET);
		matched += match;
	}
	clock_gettime(CLOCK_MONOTONIC, &b);
	printf("%.2f %ld\n", ((b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec)) / n, matched);
	return 0;
}
