/*
 * tpmrand: random bytes from the guest's TPM 2.0, for the TPM guest tests.
 *
 *   tpmrand [-n BYTES] DEVICE
 *
 * Sends TPM2_GetRandom commands (TPM 2.0 Library, Part 3, section 16.1) to DEVICE
 * (/dev/tpm0, or /dev/tpmrm0 through the kernel's resource manager) until BYTES bytes (default 16, at most 1024) have come back, and
 * prints them as one line of lowercase hex. The kernel's TPM character device takes one
 * whole command per write() and returns one whole response per read(). A TPM returns at
 * most one digest's worth of bytes per command, so the loop asks again for the rest.
 *
 * Exit status 0; 1 with a message on stderr on an error (including a non-zero TPM
 * response code, printed in hex); 2 for bad usage.
 *
 * Built static by vmsh/images/guest_tools.py (musl-gcc -static -Os) into the
 * initramfs as /bin/tpmrand. busybox has no TPM client, and tpm2-tools would bring
 * a dynamic loader and several libraries into every boot's initramfs. It writes its
 * output with write() rather than stdio: musl's printf is most of a static program's
 * size, and the guest kernel unpacks every byte of the initramfs at every boot.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <string.h>
#include <unistd.h>

#define TPM_ST_NO_SESSIONS 0x8001u
#define TPM_CC_GET_RANDOM 0x0000017bu
#define COMMAND_SIZE 12u
#define RESPONSE_HEADER 10u
#define MAX_BYTES 1024

static void put16(uint8_t *p, uint32_t v) { p[0] = (uint8_t)(v >> 8); p[1] = (uint8_t)v; }
static void put32(uint8_t *p, uint32_t v) { put16(p, v >> 16); put16(p + 2, v); }
static uint32_t get16(const uint8_t *p) { return (uint32_t)p[0] << 8 | p[1]; }
static uint32_t get32(const uint8_t *p) { return get16(p) << 16 | get16(p + 2); }

/* one line on stderr from up to four pieces (NULL pieces are skipped) */
static void say(const char *a, const char *b, const char *c, const char *d)
{
    const char *parts[] = {"tpmrand: ", a, b, c, d, "\n"};
    for (unsigned i = 0; i < sizeof parts / sizeof parts[0]; i++)
        if (parts[i] && write(2, parts[i], strlen(parts[i])) < 0)
            return;
}

static const char HEX[] = "0123456789abcdef";

/* "0x" and v in hex, into buf (at least 11 bytes) */
static const char *hex32(char *buf, uint32_t v)
{
    buf[0] = '0';
    buf[1] = 'x';
    for (int i = 0; i < 8; i++)
        buf[2 + i] = HEX[(v >> (28 - 4 * i)) & 0xf];
    buf[10] = 0;
    return buf;
}

static int usage(void)
{
    static const char text[] = "usage: tpmrand [-n BYTES] DEVICE\n";
    if (write(2, text, sizeof text - 1) < 0)
        return 2;
    return 2;
}

/* one TPM2_GetRandom round trip: returns the number of bytes stored in out, -1 on error */
static int get_random(int fd, const char *dev, uint8_t *out, unsigned want)
{
    uint8_t cmd[COMMAND_SIZE], rsp[4096];
    put16(cmd, TPM_ST_NO_SESSIONS);
    put32(cmd + 2, COMMAND_SIZE);
    put32(cmd + 6, TPM_CC_GET_RANDOM);
    put16(cmd + 10, want);
    char num[11];
    ssize_t n = write(fd, cmd, sizeof cmd);
    if (n != (ssize_t)sizeof cmd) {
        say("write ", dev, ": ", n < 0 ? strerror(errno) : "short write");
        return -1;
    }
    n = read(fd, rsp, sizeof rsp);
    if (n < 0) {
        say("read ", dev, ": ", strerror(errno));
        return -1;
    }
    if ((size_t)n < RESPONSE_HEADER || get32(rsp + 2) != (uint32_t)n) {
        say("malformed response of ", hex32(num, (uint32_t)n), " bytes", NULL);
        return -1;
    }
    uint32_t code = get32(rsp + 6);
    if (code != 0) {
        say("TPM response code ", hex32(num, code), NULL, NULL);
        return -1;
    }
    if ((size_t)n < RESPONSE_HEADER + 2) {
        say("response without a digest", NULL, NULL, NULL);
        return -1;
    }
    uint32_t got = get16(rsp + RESPONSE_HEADER);
    if (got == 0 || got > want || RESPONSE_HEADER + 2 + got > (size_t)n) {
        say("digest of ", hex32(num, got), " bytes: more than asked, or none", NULL);
        return -1;
    }
    memcpy(out, rsp + RESPONSE_HEADER + 2, got);
    return (int)got;
}

int main(int argc, char **argv)
{
    long bytes = 16;
    int arg = 1;
    if (arg < argc && strcmp(argv[arg], "-n") == 0) {
        if (arg + 1 >= argc)
            return usage();
        const char *p = argv[arg + 1];
        bytes = 0;
        do {
            if (*p < '0' || *p > '9' || bytes > MAX_BYTES)
                return usage();
            bytes = bytes * 10 + (*p - '0');
        } while (*++p);
        if (bytes < 1 || bytes > MAX_BYTES)
            return usage();
        arg += 2;
    }
    if (argc - arg != 1 || argv[arg][0] == '-')
        return usage();
    const char *dev = argv[arg];
    int fd = open(dev, O_RDWR);
    if (fd < 0) {
        say("open ", dev, ": ", strerror(errno));
        return 1;
    }
    uint8_t buf[MAX_BYTES];
    long have = 0;
    while (have < bytes) {
        int got = get_random(fd, dev, buf + have, (unsigned)(bytes - have));
        if (got < 0)
            return 1;
        have += got;
    }
    char line[2 * MAX_BYTES + 1];
    for (long i = 0; i < bytes; i++) {
        line[2 * i] = HEX[buf[i] >> 4];
        line[2 * i + 1] = HEX[buf[i] & 0xf];
    }
    line[2 * bytes] = '\n';
    return write(1, line, (size_t)(2 * bytes + 1)) == 2 * bytes + 1 ? 0 : 1;
}
