/*
 * vsock: join stdin/stdout to one AF_VSOCK stream, for vmsh's guest tests.
 *
 *   vsock listen PORT        accept one connection on PORT (any CID)
 *   vsock connect CID PORT   connect to CID:PORT (2 is the host)
 *
 * Copies socket -> stdout and stdin -> socket. At EOF on stdin the socket's sending
 * side is shut down (the peer reads EOF, and may still answer); the program ends at
 * EOF on the socket: vmsh (like cloud-hypervisor) closes both directions of a stream
 * once the host end closes, so nothing read from stdin after that could be delivered.
 * Exit status 0; 1 with a message on stderr on an error; 2 for bad usage.
 *
 * Built static by vmsh/images/guest_tools.py (musl-gcc -static -Os) into the initramfs
 * as /bin/vsock. The guest kernel runs emulated (every kernel instruction costs about a
 * microsecond), so the copy loop uses one large buffer and the fewest syscalls: one
 * poll, one read and usually one write per chunk.
 */
#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

/*
 * musl-gcc does not search /usr/include, so <linux/vm_sockets.h> is not reachable
 * (and pulling all of the kernel's uapi headers in for one struct is not worth it).
 * These are the kernel ABI values of include/uapi/linux/vm_sockets.h, which never
 * change: the address family number and a 16-byte address laid out like struct
 * sockaddr (family, 2 reserved bytes, port, CID, flags, zero padding).
 */
#ifndef AF_VSOCK
#define AF_VSOCK 40
#endif
#define VMADDR_CID_ANY 0xffffffffU

struct sockaddr_vm {
	sa_family_t svm_family;
	unsigned short svm_reserved1;
	unsigned int svm_port;
	unsigned int svm_cid;
	unsigned char svm_flags;
	unsigned char svm_zero[3];
};

_Static_assert(sizeof(struct sockaddr_vm) == sizeof(struct sockaddr), "sockaddr_vm is 16 bytes");
_Static_assert(offsetof(struct sockaddr_vm, svm_port) == 4 && offsetof(struct sockaddr_vm, svm_cid) == 8,
	       "port and CID where the kernel reads them");

/* larger than the 64 KiB a vsock packet carries, so one read takes what has arrived */
static char buf[256 << 10];

static void die(const char *what)
{
	fprintf(stderr, "vsock: %s: %s\n", what, strerror(errno));
	exit(1);
}

static unsigned int number(const char *text, const char *what)
{
	char *end;
	unsigned long value;

	errno = 0;
	value = strtoul(text, &end, 0);
	if (errno || end == text || *end || value > 0xffffffffUL) {
		fprintf(stderr, "vsock: bad %s: %s\n", what, text);
		exit(2);
	}
	return (unsigned int)value;
}

/* write() returns short counts on sockets and pipes: loop until all of it is out */
static void write_all(int fd, const char *p, size_t n, const char *what)
{
	while (n > 0) {
		ssize_t w = write(fd, p, n);

		if (w < 0) {
			if (errno == EINTR)
				continue;
			die(what);
		}
		p += w;
		n -= (size_t)w;
	}
}

static void copy(int sock)
{
	struct pollfd fds[2] = { { .fd = 0, .events = POLLIN }, { .fd = sock, .events = POLLIN } };

	for (;;) {
		ssize_t n;

		if (poll(fds, 2, -1) < 0) {
			if (errno == EINTR)
				continue;
			die("poll");
		}
		/* POLLHUP and POLLERR too: the read below then says what happened */
		if (fds[1].revents) {
			n = read(sock, buf, sizeof buf);
			if (n < 0 && errno != EINTR)
				die("read socket");
			if (n == 0)
				return;
			if (n > 0)
				write_all(1, buf, (size_t)n, "write stdout");
		}
		if (fds[0].revents) {
			n = read(0, buf, sizeof buf);
			if (n < 0 && errno != EINTR)
				die("read stdin");
			if (n == 0) {
				if (shutdown(sock, SHUT_WR) < 0)
					die("shutdown");
				fds[0].fd = -1; /* poll ignores it from now on */
			}
			if (n > 0)
				write_all(sock, buf, (size_t)n, "write socket");
		}
	}
}

int main(int argc, char **argv)
{
	struct sockaddr_vm addr = { .svm_family = AF_VSOCK };
	int sock;

	/* a reset peer should end us with a message, not a silent SIGPIPE */
	signal(SIGPIPE, SIG_IGN);
	if (argc == 3 && !strcmp(argv[1], "listen")) {
		int listener = socket(AF_VSOCK, SOCK_STREAM, 0);

		addr.svm_cid = VMADDR_CID_ANY;
		addr.svm_port = number(argv[2], "port");
		if (listener < 0)
			die("socket");
		if (bind(listener, (struct sockaddr *)&addr, sizeof addr) < 0)
			die("bind");
		if (listen(listener, 1) < 0)
			die("listen");
		sock = accept(listener, NULL, NULL);
		if (sock < 0)
			die("accept");
		close(listener);
	} else if (argc == 4 && !strcmp(argv[1], "connect")) {
		addr.svm_cid = number(argv[2], "CID");
		addr.svm_port = number(argv[3], "port");
		sock = socket(AF_VSOCK, SOCK_STREAM, 0);
		if (sock < 0)
			die("socket");
		if (connect(sock, (struct sockaddr *)&addr, sizeof addr) < 0)
			die("connect");
	} else {
		fprintf(stderr, "usage: vsock listen PORT | vsock connect CID PORT\n");
		return 2;
	}
	copy(sock);
	return 0;
}
