/* N processes that sleep until their parent goes: the process cache benchmark's population. Prints
 * "ready N" once all are forked, then waits for a line on stdin and ends them all. With a second
 * argument "distinct", each child executes this program again with its own number in its command line:
 * no two processes share a command line (forked workers otherwise share their parent's). */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

int main(int argc, char **argv)
{
	long n = argc > 1 ? atol(argv[1]) : 1000, made = 0;
	int distinct = argc > 2 && strcmp(argv[2], "distinct") == 0;
	char line[16], number[24];

	if (argc > 2 && strcmp(argv[2], "child") == 0) {
		prctl(PR_SET_PDEATHSIG, SIGKILL);
		pause();
		return 0;
	}

	for (; made < n; made++) {
		pid_t pid = fork();

		if (pid < 0)
			break;
		if (pid == 0) {
			prctl(PR_SET_PDEATHSIG, SIGKILL);
			if (distinct) {
				snprintf(number, sizeof(number), "%ld", made);
				execl("/proc/self/exe", argv[0], number, "child", (char *)NULL);
			}
			pause();
			_exit(0);
		}
	}
	printf("ready %ld\n", made);
	fflush(stdout);
	if (!fgets(line, sizeof(line), stdin))
		line[0] = 0;
	signal(SIGTERM, SIG_IGN);
	kill(0, SIGTERM);
	while (wait(NULL) > 0)
		;
	return 0;
}
