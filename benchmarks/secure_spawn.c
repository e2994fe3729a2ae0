/* Exec storm for `bpfscope secure`: WORKERS processes each spawn BINARY at RATE/WORKERS per second for
 * SECONDS seconds (one at a time, each waited for); prints how many were spawned and the rate reached. */
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

extern char **environ;

static double now(void)
{
	struct timespec t;

	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec + t.tv_nsec / 1e9;
}

int main(int argc, char **argv)
{
	double rate = argc > 1 ? atof(argv[1]) : 5000, seconds = argc > 2 ? atof(argv[2]) : 10;
	int workers = argc > 3 ? atoi(argv[3]) : 1;
	char *args[] = {argc > 4 ? argv[4] : "/usr/bin/true", "bpfscope-exec-storm", NULL};
	int pipefd[2];
	double start, next;
	long spawned = 0, total = 0;

	if (pipe(pipefd))
		return 1;
	for (int w = 0; w < workers; w++) {
		if (fork() == 0) {
			rate /= workers;
			break;
		}
		if (w == workers - 1) {
			close(pipefd[1]);
			for (long n; read(pipefd[0], &n, sizeof(n)) == sizeof(n);)
				total += n;
			while (wait(NULL) > 0)
				;
			printf("%ld %.1f\n", total, total / seconds);
			return 0;
		}
	}
	start = now();
	next = start;

	while (now() - start < seconds) {
		pid_t pid;

		if (posix_spawn(&pid, args[0], NULL, NULL, args, environ) == 0) {
			waitpid(pid, NULL, 0);
			spawned++;
		}
		next += 1.0 / rate;
		/* Sleep, not spin: a spinning spawner would take the CPU the tool under test needs. */
		if (now() < next) {
			struct timespec until = {(time_t)next, (long)((next - (time_t)next) * 1e9)};

			clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &until, NULL);
		}
	}
	if (write(pipefd[1], &spawned, sizeof(spawned)) != sizeof(spawned))
		return 1;
	return 0;
}
