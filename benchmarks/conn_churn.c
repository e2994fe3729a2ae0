/* Connection churn over loopback: a forked server accepts, reads one request, answers and closes; the
 * client opens a connection, sends a 64-byte request, reads the 64-byte answer and the server's close,
 * then closes, for SECONDS (the server closes first, so the client's ports never wait in TIME_WAIT).
 * Prints the connections completed per second. Many short connections are what makes per-connection
 * tracing (state changes, open and close events) cost the most.
 *
 *   conn_churn PORT SECONDS
 */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define MESSAGE 64

static double now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void serve(int listener)
{
	char buf[MESSAGE];

	for (;;) {
		int fd = accept(listener, NULL, NULL);

		if (fd < 0)
			continue;
		if (read(fd, buf, sizeof(buf)) > 0 && write(fd, buf, sizeof(buf)) < 0)
			perror("write");
		close(fd);
	}
}

int main(int argc, char **argv)
{
	struct sockaddr_in addr = { .sin_family = AF_INET };
	int one = 1, listener;
	double seconds, start;
	long done = 0;
	pid_t server;
	char buf[MESSAGE] = { 0 };

	if (argc != 3) {
		fprintf(stderr, "usage: %s PORT SECONDS\n", argv[0]);
		return 2;
	}
	addr.sin_port = htons(atoi(argv[1]));
	addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	seconds = atof(argv[2]);

	listener = socket(AF_INET, SOCK_STREAM, 0);
	setsockopt(listener, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	if (bind(listener, (struct sockaddr *)&addr, sizeof(addr)) || listen(listener, 4096)) {
		perror("listen");
		return 1;
	}
	server = fork();
	if (server == 0) {
		serve(listener);
		return 0;
	}
	close(listener);

	start = now();
	while (now() - start < seconds) {
		int fd = socket(AF_INET, SOCK_STREAM, 0);

		if (connect(fd, (struct sockaddr *)&addr, sizeof(addr)) == 0 &&
		    write(fd, buf, sizeof(buf)) == sizeof(buf) && read(fd, buf, sizeof(buf)) > 0 &&
		    read(fd, buf, sizeof(buf)) == 0)
			done++;
		close(fd);
	}
	printf("%.1f\n", done / (now() - start));
	kill(server, SIGKILL);
	waitpid(server, NULL, 0);
	return 0;
}
