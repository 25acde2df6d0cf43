/* The firehose benchmark's Redis subscriber in C (loadtests/publication_tap.py is the same tool in Python; this one
 * costs a fraction of a microsecond a message, so the load CPU it shares with Redis and the fake exchange stays
 * free for Redis).
 *
 *   tap --host 127.0.0.1 --port 6379 --pattern 'pg:md:binance:{*' [--password P]
 *
 * One PSUBSCRIBE; every pmessage is counted, its envelope's sequence checked per channel (<epoch>:<seq>:<ms>:...:
 * a seq that is not the channel's last + 1 within an epoch is a gap; a new epoch is counted apart), and when the
 * payload holds "E":<digits> (the fake exchange's send time in microseconds) now - E is recorded.
 * Commands on stdin, one JSON line answered per command on stdout, like the Python tap:
 *   {"cmd":"reset"} {"cmd":"count"} {"cmd":"report"} {"cmd":"quit"}
 * It prints {"event":"ready"} once Redis confirmed the subscription, and exits when stdin closes.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <netdb.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static void die(const char *what) {
    fprintf(stderr, "tap: %s: %s\n", what, strerror(errno));
    exit(1);
}

/* ---- per channel: the last (epoch, seq), open addressing on the channel name ---- */

typedef struct {
    char *name;
    size_t len;
    uint64_t epoch;
    uint64_t seq;
} slot_t;

static slot_t *slots;
static size_t slot_cap = 1 << 14, slot_used;

static uint64_t hash_bytes(const char *data, size_t len) {
    uint64_t h = 1469598103934665603ULL;
    for (size_t i = 0; i < len; i++) h = (h ^ (unsigned char)data[i]) * 1099511628211ULL;
    return h;
}

static slot_t *channel_slot(const char *name, size_t len, int *fresh) {
    if ((slot_used + 1) * 2 > slot_cap) {
        size_t old_cap = slot_cap;
        slot_t *old = slots;
        slot_cap *= 2;
        slots = calloc(slot_cap, sizeof(slot_t));
        if (!slots) die("calloc");
        slot_used = 0;
        for (size_t i = 0; i < old_cap; i++) {
            if (!old[i].name) continue;
            size_t j = hash_bytes(old[i].name, old[i].len) & (slot_cap - 1);
            while (slots[j].name) j = (j + 1) & (slot_cap - 1);
            slots[j] = old[i];
            slot_used++;
        }
        free(old);
    }
    size_t j = hash_bytes(name, len) & (slot_cap - 1);
    while (slots[j].name) {
        if (slots[j].len == len && memcmp(slots[j].name, name, len) == 0) {
            *fresh = 0;
            return &slots[j];
        }
        j = (j + 1) & (slot_cap - 1);
    }
    slots[j].name = malloc(len);
    if (!slots[j].name) die("malloc");
    memcpy(slots[j].name, name, len);
    slots[j].len = len;
    slot_used++;
    *fresh = 1;
    return &slots[j];
}

/* ---- the window's figures ---- */

static uint64_t count, gaps, epoch_changes, new_channels;
static int64_t *lags;
static size_t lag_len, lag_cap;

static void reset(void) {
    count = gaps = epoch_changes = new_channels = 0;
    lag_len = 0;
}

static int64_t now_us(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

static uint64_t digits(const char *p, const char *end, const char **after) {
    uint64_t v = 0;
    while (p < end && *p >= '0' && *p <= '9') v = v * 10 + (uint64_t)(*p++ - '0');
    *after = p;
    return v;
}

static void on_message(const char *channel, size_t channel_len, const char *env, size_t env_len, int64_t now) {
    const char *end = env + env_len, *p;
    count++;
    uint64_t epoch = digits(env, end, &p);
    if (p >= end || *p != ':') return;
    uint64_t seq = digits(p + 1, end, &p);
    int fresh;
    slot_t *slot = channel_slot(channel, channel_len, &fresh);
    if (fresh) {
        new_channels++;
    } else if (slot->epoch != epoch) {
        epoch_changes++;
    } else if (seq != slot->seq + 1) {
        gaps++;
    }
    slot->epoch = epoch;
    slot->seq = seq;
    const char *mark = memmem(p, (size_t)(end - p), "\"E\":", 4);
    if (mark) {
        const char *after;
        uint64_t sent = digits(mark + 4, end, &after);
        if (after > mark + 4) {
            if (lag_len == lag_cap) {
                lag_cap = lag_cap ? lag_cap * 2 : 1 << 16;
                lags = realloc(lags, lag_cap * sizeof(int64_t));
                if (!lags) die("realloc");
            }
            lags[lag_len++] = now - (int64_t)sent;
        }
    }
}

/* ---- RESP: the pmessage arrays (and the psubscribe confirmation) ---- */

static char *buf;
static size_t buf_len, buf_cap = 1 << 22;
static int subscribed;

/* A bulk string "$<n>\r\n<n bytes>\r\n" at *p: its start and length; 0 if incomplete, -1 if not RESP. */
static int bulk(const char **p, const char *end, const char **data, size_t *len) {
    const char *q = *p;
    if (q >= end) return 0;
    if (*q != '$') return -1;
    const char *after;
    uint64_t n = digits(q + 1, end, &after);
    if (after + 2 > end) return 0;
    if (after[0] != '\r') return -1;
    if ((size_t)(end - (after + 2)) < n + 2) return 0;
    *data = after + 2;
    *len = n;
    *p = after + 2 + n + 2;
    return 1;
}

static void feed(void) {
    const char *p = buf, *end = buf + buf_len;
    int64_t now = now_us();
    while (p < end) {
        const char *start = p;
        if (*p != '*') {
            fprintf(stderr, "tap: unexpected RESP byte %d\n", *p);
            exit(1);
        }
        const char *after;
        uint64_t items = digits(p + 1, end, &after);
        if (after + 2 > end) break;
        p = after + 2;
        const char *parts[4];
        size_t lens[4];
        int ok = 1, incomplete = 0;
        for (uint64_t i = 0; i < items; i++) {
            if (p < end && *p == ':') { /* psubscribe's count */
                const char *line = memmem(p, (size_t)(end - p), "\r\n", 2);
                if (!line) { incomplete = 1; break; }
                p = line + 2;
                continue;
            }
            const char *data;
            size_t len;
            int r = bulk(&p, end, &data, &len);
            if (r == 0) { incomplete = 1; break; }
            if (r < 0) { fprintf(stderr, "tap: not RESP\n"); exit(1); }
            if (i < 4) { parts[i] = data; lens[i] = len; }
        }
        if (incomplete) { p = start; break; }
        if (items == 4 && lens[0] == 8 && memcmp(parts[0], "pmessage", 8) == 0) {
            on_message(parts[2], lens[2], parts[3], lens[3], now);
        } else if (items == 3 && lens[0] == 10 && memcmp(parts[0], "psubscribe", 10) == 0) {
            subscribed = 1;
        } else {
            ok = 0;
        }
        (void)ok;
    }
    size_t used = (size_t)(p - buf);
    memmove(buf, buf + used, buf_len - used);
    buf_len -= used;
}

static int compare(const void *a, const void *b) {
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

static void percentile(const char *key, double fraction) {
    if (!lag_len) { printf("\"%s\":null,", key); return; }
    size_t rank = (size_t)(fraction * (double)lag_len + 0.999999999);
    if (rank < 1) rank = 1;
    if (rank > lag_len) rank = lag_len;
    printf("\"%s\":%lld,", key, (long long)lags[rank - 1]);
}

static void report(void) {
    qsort(lags, lag_len, sizeof(int64_t), compare);
    struct rusage usage;
    getrusage(RUSAGE_SELF, &usage);
    double cpu = usage.ru_utime.tv_sec + usage.ru_stime.tv_sec + (usage.ru_utime.tv_usec + usage.ru_stime.tv_usec) / 1e6;
    printf("{\"event\":\"report\",\"count\":%llu,\"timed\":%zu,", (unsigned long long)count, lag_len);
    percentile("lag_p50_us", 0.50);
    percentile("lag_p90_us", 0.90);
    percentile("lag_p99_us", 0.99);
    if (lag_len) printf("\"lag_max_us\":%lld,", (long long)lags[lag_len - 1]);
    else printf("\"lag_max_us\":null,");
    printf("\"seq_gaps\":%llu,\"epoch_changes\":%llu,\"new_channels\":%llu,\"channels_total\":%zu,\"cpu_s\":%.3f}\n",
           (unsigned long long)gaps, (unsigned long long)epoch_changes, (unsigned long long)new_channels, slot_used,
           cpu);
    fflush(stdout);
}

int main(int argc, char **argv) {
    const char *host = "127.0.0.1", *port = "6379", *pattern = NULL, *password = NULL;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--host")) host = argv[i + 1];
        else if (!strcmp(argv[i], "--port")) port = argv[i + 1];
        else if (!strcmp(argv[i], "--pattern")) pattern = argv[i + 1];
        else if (!strcmp(argv[i], "--password")) password = argv[i + 1];
    }
    if (!pattern) { fprintf(stderr, "usage: tap --host H --port P --pattern PATTERN [--password PW]\n"); return 2; }
    slots = calloc(slot_cap, sizeof(slot_t));
    buf = malloc(buf_cap);
    if (!slots || !buf) die("malloc");

    struct addrinfo hints = {0}, *addr;
    hints.ai_socktype = SOCK_STREAM;
    if (getaddrinfo(host, port, &hints, &addr) != 0) { fprintf(stderr, "tap: cannot resolve %s\n", host); return 1; }
    int fd = socket(addr->ai_family, SOCK_STREAM, 0);
    if (fd < 0 || connect(fd, addr->ai_addr, addr->ai_addrlen) < 0) die("connect");
    freeaddrinfo(addr);
    int rcvbuf = 4 << 20;
    setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &rcvbuf, sizeof rcvbuf);
    char command[4096];
    int n;
    if (password) {
        n = snprintf(command, sizeof command, "*3\r\n$4\r\nAUTH\r\n$7\r\ndefault\r\n$%zu\r\n%s\r\n", strlen(password),
                     password);
        if (write(fd, command, (size_t)n) != n) die("write");
        char reply[256];
        if (read(fd, reply, sizeof reply) <= 0 || reply[0] != '+') { fprintf(stderr, "tap: AUTH refused\n"); return 1; }
    }
    n = snprintf(command, sizeof command, "*2\r\n$10\r\nPSUBSCRIBE\r\n$%zu\r\n%s\r\n", strlen(pattern), pattern);
    if (write(fd, command, (size_t)n) != n) die("write");

    struct pollfd fds[2] = {{.fd = fd, .events = POLLIN}, {.fd = 0, .events = POLLIN}};
    char line[1024];
    size_t line_len = 0;
    int announced = 0;
    reset();
    for (;;) {
        if (poll(fds, announced ? 2 : 1, -1) < 0) {
            if (errno == EINTR) continue;
            die("poll");
        }
        if (fds[0].revents & (POLLIN | POLLHUP | POLLERR)) {
            if (buf_len == buf_cap) {
                buf_cap *= 2;
                buf = realloc(buf, buf_cap);
                if (!buf) die("realloc");
            }
            ssize_t got = read(fd, buf + buf_len, buf_cap - buf_len);
            if (got <= 0) { printf("{\"event\":\"error\",\"error\":\"Redis closed the connection\"}\n"); return 1; }
            buf_len += (size_t)got;
            feed();
            if (subscribed && !announced) {
                printf("{\"event\":\"ready\"}\n");
                fflush(stdout);
                announced = 1;
            }
        }
        if (announced && (fds[1].revents & (POLLIN | POLLHUP))) {
            ssize_t got = read(0, line + line_len, sizeof line - 1 - line_len);
            if (got <= 0) return 0;
            line_len += (size_t)got;
            char *newline;
            while ((newline = memchr(line, '\n', line_len))) {
                *newline = 0;
                if (strstr(line, "\"reset\"")) { reset(); printf("{\"event\":\"reset\"}\n"); }
                else if (strstr(line, "\"count\"")) printf("{\"event\":\"count\",\"count\":%llu}\n", (unsigned long long)count);
                else if (strstr(line, "\"report\"")) report();
                else if (strstr(line, "\"quit\"")) return 0;
                else printf("{\"event\":\"error\",\"error\":\"unknown command\"}\n");
                fflush(stdout);
                size_t used = (size_t)(newline - line) + 1;
                memmove(line, line + used, line_len - used);
                line_len -= used;
            }
        }
    }
}
