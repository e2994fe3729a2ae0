/* images: a thumbnail service in C, built without frame pointers (gcc -O2 -fomit-frame-pointer).
 *
 * GET /thumbnail checksums a 512x512 image (CRC-32) and blurs it. The checksum has two versions: the
 * bit-at-a-time loop (the default) and the table-driven one, eight times faster (CHECKSUM=fast): the
 * "optimisation" the tutorial's before/after profile shows.
 *
 *     images PORT
 */
#define _GNU_SOURCE
#include <netinet/in.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define SIDE 512
#define IMAGE_BYTES (SIDE * SIDE)

static int use_fast;
static uint32_t crc_table[256];

__attribute__((noinline)) uint32_t checksum_slow(const uint8_t *p, size_t n)
{
	uint32_t crc = ~0u;
	for (size_t i = 0; i < n; i++) {
		crc ^= p[i];
		for (int k = 0; k < 8; k++)
			crc = (crc >> 1) ^ (0xEDB88320u & -(crc & 1));
	}
	return ~crc;
}

__attribute__((noinline)) uint32_t checksum_fast(const uint8_t *p, size_t n)
{
	uint32_t crc = ~0u;
	for (size_t i = 0; i < n; i++)
		crc = crc_table[(crc ^ p[i]) & 0xff] ^ (crc >> 8);
	return ~crc;
}

/* A 3x3 box blur: the work that stays once the checksum is fast. */
__attribute__((noinline)) void blur(const uint8_t *src, uint8_t *dst)
{
	for (int y = 1; y < SIDE - 1; y++)
		for (int x = 1; x < SIDE - 1; x++) {
			unsigned sum = 0;
			for (int dy = -1; dy <= 1; dy++)
				for (int dx = -1; dx <= 1; dx++)
					sum += src[(y + dy) * SIDE + x + dx];
			dst[y * SIDE + x] = sum / 9;
		}
}

__attribute__((noinline)) int handle_thumbnail(uint8_t *image, uint8_t *out, unsigned seed, char *body)
{
	for (int i = 0; i < IMAGE_BYTES; i += 64)
		image[i] = (uint8_t)(seed + i);
	uint32_t crc = use_fast ? checksum_fast(image, IMAGE_BYTES) : checksum_slow(image, IMAGE_BYTES);
	blur(image, out);
	return sprintf(body, "thumbnail %u crc %08x centre %u\n", seed, crc, out[IMAGE_BYTES / 2 + SIDE / 2]);
}

/* HTTP/1.1 with keep-alive, one thread per connection: enough for a load generator's GETs. */
static void *serve(void *arg)
{
	int fd = (int)(intptr_t)arg;
	uint8_t *image = calloc(2, IMAGE_BYTES);
	char request[4096], body[128], reply[256];
	size_t have = 0;
	unsigned seed = 0;

	for (;;) {
		char *end = memmem(request, have, "\r\n\r\n", 4);
		if (!end) {
			ssize_t n = have < sizeof(request) ? read(fd, request + have, sizeof(request) - have) : 0;
			if (n <= 0)
				break;
			have += n;
			continue;
		}
		int len = strncmp(request, "GET /thumbnail", 14) == 0
				  ? handle_thumbnail(image, image + IMAGE_BYTES, seed++, body)
				  : sprintf(body, "not found\n");
		/* One write: a header and a body written apart wait out the client's delayed ACK (40 ms). */
		int n = sprintf(reply, "HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s", len, body);
		if (write(fd, reply, n) != n)
			break;
		size_t used = end + 4 - request;
		memmove(request, request + used, have - used);
		have -= used;
	}
	free(image);
	close(fd);
	return NULL;
}

int main(int argc, char **argv)
{
	struct sockaddr_in addr = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(0x7f000001)};
	int one = 1, listener = socket(AF_INET, SOCK_STREAM, 0);

	use_fast = getenv("CHECKSUM") && strcmp(getenv("CHECKSUM"), "fast") == 0;
	for (uint32_t i = 0; i < 256; i++) {
		uint32_t c = i;
		for (int k = 0; k < 8; k++)
			c = (c >> 1) ^ (0xEDB88320u & -(c & 1));
		crc_table[i] = c;
	}
	addr.sin_port = htons(atoi(argv[1]));
	setsockopt(listener, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	if (bind(listener, (struct sockaddr *)&addr, sizeof(addr)) || listen(listener, 64)) {
		perror("images: listen");
		return 1;
	}
	for (;;) {
		int fd = accept(listener, NULL, NULL);
		pthread_t thread;
		if (fd >= 0 && pthread_create(&thread, NULL, serve, (void *)(intptr_t)fd) == 0)
			pthread_detach(thread);
	}
}
