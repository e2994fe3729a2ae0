/* One offence timed: prints CLOCK_MONOTONIC (ns) just before an openat() of PATH (which the benchmark's
 * policy kills or reports), then sleeps: the parent measures when the kill or the event arrives. */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

int main(int argc, char **argv)
{
	struct timespec t;

	clock_gettime(CLOCK_MONOTONIC, &t);
	printf("%lld\n", (long long)t.tv_sec * 1000000000LL + t.tv_nsec);
	fflush(stdout);
	close(open(argv[1], O_RDONLY));
	sleep(2);
	return 0;
}
