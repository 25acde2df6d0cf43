/*
 * loadgen: an epoll WebSocket load generator for pricegate's fan-out benchmark (loopback only).
 *
 * It opens N client WebSockets to one or more ports on 127.0.0.1 (client i asks for /ws/<stream i % S> on port
 * i % P), spreading source addresses over 127.0.0.0/8 (a new source address every --per-src clients, so the
 * ~28k ephemeral ports of one source address never run out), then reads every frame on one thread:
 * it counts frames and bytes, answers pings, detects closes and resets, and parses the publish time in each
 * text frame (the payload's "E" field, in microseconds since the epoch) to build a latency histogram
 * (1 us resolution below 256 us, then 128 sub-buckets per power of two: < 0.8 % error).
 *
 * A fraction of the clients (--stall-fraction) can be made to never read after their handshake: they are
 * dropped from epoll, so their kernel receive buffers fill and the server sees a stalled client
 * (--stall-rcvbuf gives them a small SO_RCVBUF so that happens within a second instead of after megabytes).
 *
 * Control: one command per line on stdin, one JSON object per line on stdout.
 *   stats      counters since the last reset, the latency percentiles, and our own CPU time (getrusage)
 *   histogram  the latency histogram's non-empty buckets (to merge several generators)
 *   reset      zero the frame, byte and latency counters
 *   reconnect  reopen every client that was lost
 *   quit       close everything and exit
 * The first line printed is {"event":"connected",...} once every client finished its handshake (or failed).
 *
 * Built at run time by loadtests/loadgen.py with the system C compiler; no dependencies beyond libc.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#ifndef IP_BIND_ADDRESS_NO_PORT
#define IP_BIND_ADDRESS_NO_PORT 24
#endif

enum { ST_IDLE = 0, ST_CONNECTING, ST_HANDSHAKE, ST_OPEN, ST_CLOSED };

typedef struct {
    int fd;
    uint8_t state;
    uint8_t stalled;
    uint8_t counted_lost;
    uint16_t stream;
    uint16_t port_index;
    uint32_t frames;   /* since the last reset */
    char *carry;       /* bytes of an incomplete frame (or handshake response) kept between reads */
    uint32_t carry_len;
    uint32_t carry_cap;
} client_t;

#define HIST_LINEAR 256
#define HIST_SUB 128
#define HIST_OCTAVES 40
#define HIST_SIZE (HIST_LINEAR + HIST_OCTAVES * HIST_SUB)

static uint64_t hist[HIST_SIZE];
static uint64_t hist_count, hist_max, hist_unparsed;
static uint64_t frames_total, bytes_total, pings, close_frames;
static uint64_t lost_total;       /* clients lost since start (close frame, EOF or error after the handshake) */
static uint64_t lost_since_reset; /* the same, since the last reset */
static uint64_t connect_failures; /* connects or handshakes that did not succeed */
static int last_close_code = -1;

static client_t *clients;
static int n_clients, n_streams, n_ports;
static char **streams;
static int *ports;
static const char *host = "127.0.0.1";
static const char *path_prefix = "/ws/";
static const char *extra_header = ""; /* --header "Name: value": sent in every handshake (e.g. an API key) */
static int per_src = 10000;
static int src_offset = 0; /* first source address index: several generators use disjoint addresses */
static uint64_t socket_errors;
static int concurrency = 256;
static double connect_timeout_s = 120.0;
static double stall_fraction = 0.0;
static int rcvbuf = 0;
static int stall_rcvbuf = 0;
static int abort_on_quit = 0; /* quit with RST (SO_LINGER 0), as a crashed client with unread data does */
static int epfd;
static int in_flight; /* clients in ST_CONNECTING or ST_HANDSHAKE */
static int next_to_open;
static char *readbuf;
#define READBUF_SIZE (1 << 20)

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static uint64_t wall_us(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
}

static inline int bucket_of(uint64_t v) {
    if (v < HIST_LINEAR) return (int)v;
    int e = 63 - __builtin_clzll(v); /* >= 8 */
    int sub = (int)((v >> (e - 7)) & (HIST_SUB - 1));
    int idx = HIST_LINEAR + (e - 8) * HIST_SUB + sub;
    return idx < HIST_SIZE ? idx : HIST_SIZE - 1;
}

static uint64_t bucket_high(int b) { /* the largest value in bucket b (reported percentiles never understate) */
    if (b < HIST_LINEAR) return (uint64_t)b;
    int e = (b - HIST_LINEAR) / HIST_SUB + 8;
    int sub = (b - HIST_LINEAR) % HIST_SUB;
    return (((uint64_t)(HIST_SUB + sub + 1)) << (e - 7)) - 1;
}

static uint64_t percentile(double q) {
    if (hist_count == 0) return 0;
    uint64_t rank = (uint64_t)(q * (double)hist_count);
    if (rank >= hist_count) rank = hist_count - 1;
    uint64_t seen = 0;
    for (int b = 0; b < HIST_SIZE; b++) {
        seen += hist[b];
        if (seen > rank) {
            uint64_t v = bucket_high(b);
            return v < hist_max ? v : hist_max;
        }
    }
    return hist_max;
}

static void raise_nofile(int need) {
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) != 0) return;
    if (rl.rlim_cur >= (rlim_t)need) return;
    rl.rlim_cur = need;
    if (rl.rlim_max < (rlim_t)need) rl.rlim_max = need; /* works as root (CAP_SYS_RESOURCE) */
    if (setrlimit(RLIMIT_NOFILE, &rl) != 0) {
        getrlimit(RLIMIT_NOFILE, &rl);
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
        fprintf(stderr, "loadgen: RLIMIT_NOFILE capped at %llu (needed %d)\n", (unsigned long long)rl.rlim_max,
                need);
    }
}

static void carry_set(client_t *c, const char *data, size_t len) {
    if (len > c->carry_cap) {
        size_t cap = len < 512 ? 512 : len;
        char *p = realloc(c->carry, cap);
        if (!p) { perror("realloc"); exit(3); }
        c->carry = p;
        c->carry_cap = (uint32_t)cap;
    }
    if (len) memmove(c->carry, data, len);
    c->carry_len = (uint32_t)len;
}

static void close_client(client_t *c, int lost) {
    if (c->fd >= 0) {
        epoll_ctl(epfd, EPOLL_CTL_DEL, c->fd, NULL);
        close(c->fd);
        c->fd = -1;
    }
    if (c->state == ST_CONNECTING || c->state == ST_HANDSHAKE) {
        in_flight--;
        connect_failures++;
    } else if (c->state == ST_OPEN && lost && !c->counted_lost) {
        lost_total++;
        lost_since_reset++;
        c->counted_lost = 1;
    }
    c->state = ST_CLOSED;
    c->carry_len = 0;
}

static int open_client(int i) {
    client_t *c = &clients[i];
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        if (socket_errors++ == 0) perror("loadgen: socket (further errors are only counted)");
        c->state = ST_CLOSED;
        connect_failures++;
        return -1;
    }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    int want_rcvbuf = c->stalled && stall_rcvbuf > 0 ? stall_rcvbuf : rcvbuf;
    if (want_rcvbuf > 0) setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &want_rcvbuf, sizeof want_rcvbuf);
    /* Source address 127.0.0.(1 + i / per_src): the whole 127/8 is local on Linux. */
    struct sockaddr_in src = {0};
    src.sin_family = AF_INET;
    uint32_t k = (uint32_t)(i / per_src + src_offset);
    src.sin_addr.s_addr = htonl(0x7F000001u + k);
    setsockopt(fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof one);
    if (bind(fd, (struct sockaddr *)&src, sizeof src) != 0) {
        perror("loadgen: bind");
        close(fd);
        c->state = ST_CLOSED;
        connect_failures++;
        return -1;
    }
    struct sockaddr_in dst = {0};
    dst.sin_family = AF_INET;
    dst.sin_port = htons((uint16_t)ports[c->port_index]);
    inet_pton(AF_INET, host, &dst.sin_addr);
    c->fd = fd;
    c->state = ST_CONNECTING;
    c->counted_lost = 0;
    c->carry_len = 0;
    in_flight++;
    struct epoll_event ev = {.events = EPOLLOUT | EPOLLIN | EPOLLRDHUP, .data.u32 = (uint32_t)i};
    epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev);
    if (connect(fd, (struct sockaddr *)&dst, sizeof dst) != 0 && errno != EINPROGRESS) {
        close_client(c, 0);
        return -1;
    }
    return 0;
}

static void send_handshake(int i) {
    client_t *c = &clients[i];
    char req[1024];
    int n = snprintf(req, sizeof req,
                     "GET %s%s HTTP/1.1\r\nHost: %s:%d\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n%s%s\r\n",
                     path_prefix, streams[c->stream], host, ports[c->port_index], extra_header,
                     extra_header[0] ? "\r\n" : "");
    if (n < 0 || n >= (int)sizeof req) {
        close_client(c, 0);
        return;
    }
    ssize_t w = send(c->fd, req, (size_t)n, MSG_NOSIGNAL);
    if (w != n) { /* a fresh socket always takes a few hundred bytes */
        close_client(c, 0);
        return;
    }
    c->state = ST_HANDSHAKE;
    struct epoll_event ev = {.events = EPOLLIN | EPOLLRDHUP, .data.u32 = (uint32_t)i};
    epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev);
}

static void send_pong(client_t *c, const char *payload, size_t len) {
    /* Client frames must be masked; a zero mask key leaves the payload as is. */
    char frame[8 + 125];
    if (len > 125) len = 125;
    frame[0] = (char)0x8A;
    frame[1] = (char)(0x80 | len);
    memset(frame + 2, 0, 4);
    memcpy(frame + 6, payload, len);
    (void)!send(c->fd, frame, 6 + len, MSG_NOSIGNAL);
}

/* The publish time: the digits after "E": near the start of the payload (microseconds since the epoch). */
static inline int parse_publish_us(const char *p, size_t len, uint64_t *out) {
    size_t lim = len < 64 ? len : 64;
    const char *m = memmem(p, lim, "\"E\":", 4);
    if (!m) return 0;
    const char *d = m + 4, *end = p + len;
    uint64_t v = 0;
    int digits = 0;
    while (d < end && *d >= '0' && *d <= '9') { v = v * 10 + (uint64_t)(*d - '0'); d++; digits++; }
    if (digits < 13) return 0;
    *out = v;
    return 1;
}

/* Parse every complete frame in buf; returns bytes consumed, or -1 if the connection must be closed. */
static ssize_t parse_frames(client_t *c, const char *buf, size_t len, uint64_t now) {
    size_t pos = 0;
    while (len - pos >= 2) {
        const uint8_t *h = (const uint8_t *)buf + pos;
        int opcode = h[0] & 0x0F;
        uint64_t plen = h[1] & 0x7F;
        size_t hl = 2;
        if (h[1] & 0x80) return -1; /* servers never mask */
        if (plen == 126) {
            if (len - pos < 4) break;
            plen = ((uint64_t)h[2] << 8) | h[3];
            hl = 4;
        } else if (plen == 127) {
            if (len - pos < 10) break;
            plen = 0;
            for (int b = 0; b < 8; b++) plen = (plen << 8) | h[2 + b];
            hl = 10;
        }
        if (plen > (64u << 20)) return -1;
        if (len - pos < hl + plen) break;
        const char *payload = buf + pos + hl;
        if (opcode == 1 || opcode == 2 || opcode == 0) {
            frames_total++;
            c->frames++;
            uint64_t pub;
            if (opcode == 1 && parse_publish_us(payload, (size_t)plen, &pub)) {
                uint64_t lat = now > pub ? now - pub : 0;
                hist[bucket_of(lat)]++;
                hist_count++;
                if (lat > hist_max) hist_max = lat;
            } else {
                hist_unparsed++;
            }
        } else if (opcode == 9) {
            pings++;
            send_pong(c, payload, (size_t)plen);
        } else if (opcode == 8) {
            close_frames++;
            if (plen >= 2) last_close_code = ((uint8_t)payload[0] << 8) | (uint8_t)payload[1];
            return -1;
        }
        bytes_total += hl + plen;
        pos += hl + plen;
    }
    return (ssize_t)pos;
}

static void on_readable(int i) {
    client_t *c = &clients[i];
    for (int rounds = 0; rounds < 4; rounds++) {
        size_t have = c->carry_len;
        if (have) memcpy(readbuf, c->carry, have);
        ssize_t r = recv(c->fd, readbuf + have, READBUF_SIZE - have, 0);
        if (r == 0 || (r < 0 && errno != EAGAIN && errno != EINTR)) {
            close_client(c, 1);
            return;
        }
        if (r < 0) return;
        size_t len = have + (size_t)r;
        const char *data = readbuf;
        if (c->state == ST_HANDSHAKE) {
            const char *end = memmem(data, len, "\r\n\r\n", 4);
            if (!end) {
                if (len > 8192) { close_client(c, 0); return; }
                carry_set(c, data, len);
                continue;
            }
            if (len < 12 || memcmp(data + 9, "101", 3) != 0) {
                close_client(c, 0);
                return;
            }
            in_flight--;
            c->state = ST_OPEN;
            size_t hdr = (size_t)(end + 4 - data);
            data += hdr;
            len -= hdr;
            if (c->stalled) {
                /* Never read again: the kernel buffers fill and the server sees a stalled client. */
                epoll_ctl(epfd, EPOLL_CTL_DEL, c->fd, NULL);
                c->carry_len = 0;
                return;
            }
        }
        ssize_t used = parse_frames(c, data, len, wall_us());
        if (used < 0) {
            close_client(c, 1);
            return;
        }
        carry_set(c, data + used, len - (size_t)used);
        if ((size_t)r < READBUF_SIZE - have) return; /* drained the socket */
    }
}

static void pump_opens(void) {
    while (in_flight < concurrency && next_to_open < n_clients) {
        int i = next_to_open++;
        if (clients[i].state == ST_IDLE || clients[i].state == ST_CLOSED) open_client(i);
    }
}

static void handle_event(struct epoll_event *ev) {
    int i = (int)ev->data.u32;
    client_t *c = &clients[i];
    if (c->fd < 0) return;
    if (c->state == ST_CONNECTING) {
        int err = 0;
        socklen_t el = sizeof err;
        getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &el);
        if (err || (ev->events & (EPOLLERR | EPOLLHUP))) {
            close_client(c, 0);
            return;
        }
        if (ev->events & EPOLLOUT) send_handshake(i);
        return;
    }
    if (ev->events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR)) on_readable(i);
}

static int count_open(void) {
    int n = 0;
    for (int i = 0; i < n_clients; i++) n += clients[i].state == ST_OPEN;
    return n;
}

/* Open every client not open yet, with at most `concurrency` handshakes in flight; bounded by connect_timeout_s. */
static void connect_all(const char *event) {
    double start = now_s();
    uint64_t failures_before = connect_failures;
    next_to_open = 0;
    for (int i = 0; i < n_clients; i++)
        if (clients[i].state == ST_CLOSED) clients[i].state = ST_IDLE;
    struct epoll_event evs[1024];
    for (;;) {
        pump_opens();
        if (in_flight == 0 && next_to_open >= n_clients) break;
        if (now_s() - start > connect_timeout_s) {
            for (int i = 0; i < n_clients; i++)
                if (clients[i].state == ST_CONNECTING || clients[i].state == ST_HANDSHAKE) close_client(&clients[i], 0);
            break;
        }
        int n = epoll_wait(epfd, evs, 1024, 100);
        for (int k = 0; k < n; k++)
            if (evs[k].data.u32 != UINT32_MAX) handle_event(&evs[k]); /* stdin waits until we are done */
    }
    int open = count_open();
    int *per_stream = calloc((size_t)n_streams, sizeof(int));
    for (int i = 0; i < n_clients; i++)
        if (clients[i].state == ST_OPEN && !clients[i].stalled) per_stream[clients[i].stream]++;
    printf("{\"event\":\"%s\",\"open\":%d,\"clients\":%d,\"failed\":%llu,\"elapsed_s\":%.3f,\"reading_per_stream\":[",
           event, open, n_clients, (unsigned long long)(connect_failures - failures_before), now_s() - start);
    for (int s = 0; s < n_streams; s++) printf("%s%d", s ? "," : "", per_stream[s]);
    printf("]}\n");
    fflush(stdout);
    free(per_stream);
}

static void print_stats(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    int open = 0, zero = 0, reading = 0;
    uint32_t minf = UINT32_MAX, maxf = 0;
    for (int i = 0; i < n_clients; i++) {
        client_t *c = &clients[i];
        if (c->state != ST_OPEN) continue;
        open++;
        if (c->stalled) continue;
        reading++;
        if (c->frames == 0) zero++;
        if (c->frames < minf) minf = c->frames;
        if (c->frames > maxf) maxf = c->frames;
    }
    if (reading == 0) minf = 0;
    printf("{\"event\":\"stats\",\"frames\":%llu,\"bytes\":%llu,\"latency_count\":%llu,\"unparsed\":%llu,"
           "\"p50_us\":%llu,\"p90_us\":%llu,\"p99_us\":%llu,\"p999_us\":%llu,\"max_us\":%llu,"
           "\"open\":%d,\"reading\":%d,\"zero_frame_clients\":%d,\"min_frames\":%u,\"max_frames\":%u,"
           "\"lost\":%llu,\"lost_total\":%llu,\"close_frames\":%llu,\"last_close_code\":%d,\"pings\":%llu,"
           "\"cpu_user_s\":%.6f,\"cpu_sys_s\":%.6f,\"monotonic_s\":%.6f}\n",
           (unsigned long long)frames_total, (unsigned long long)bytes_total, (unsigned long long)hist_count,
           (unsigned long long)hist_unparsed, (unsigned long long)percentile(0.50),
           (unsigned long long)percentile(0.90), (unsigned long long)percentile(0.99),
           (unsigned long long)percentile(0.999), (unsigned long long)hist_max, open, reading, zero, minf, maxf,
           (unsigned long long)lost_since_reset, (unsigned long long)lost_total, (unsigned long long)close_frames,
           last_close_code, (unsigned long long)pings, ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6,
           ru.ru_stime.tv_sec + ru.ru_stime.tv_usec / 1e6, now_s());
    fflush(stdout);
}

/* The latency histogram as [[bucket upper bound in us, count], ...] for non-empty buckets, so an orchestrator
   driving several generators can merge them into exact-bucket percentiles. */
static void print_histogram(void) {
    printf("{\"event\":\"histogram\",\"max_us\":%llu,\"buckets\":[", (unsigned long long)hist_max);
    int first = 1;
    for (int b = 0; b < HIST_SIZE; b++) {
        if (!hist[b]) continue;
        printf("%s[%llu,%llu]", first ? "" : ",", (unsigned long long)bucket_high(b), (unsigned long long)hist[b]);
        first = 0;
    }
    printf("]}\n");
    fflush(stdout);
}

static void reset_stats(void) {
    memset(hist, 0, sizeof hist);
    hist_count = hist_max = hist_unparsed = 0;
    frames_total = bytes_total = 0;
    lost_since_reset = 0;
    for (int i = 0; i < n_clients; i++) clients[i].frames = 0;
}

static char **split_csv(const char *s, int *count) {
    int n = 1;
    for (const char *p = s; *p; p++) n += *p == ',';
    char **out = calloc((size_t)n, sizeof(char *));
    char *copy = strdup(s), *save = NULL;
    int k = 0;
    for (char *tok = strtok_r(copy, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) out[k++] = tok;
    *count = k;
    return out;
}

static void usage(void) {
    fprintf(stderr,
            "usage: loadgen --clients N --ports P[,P2...] --streams s1,s2,... [--host 127.0.0.1] [--path-prefix /ws/]\n"
            "               [--per-src 10000] [--src-offset 0] [--concurrency 256] [--connect-timeout 120] [--stall-fraction 0]\n"
            "               [--rcvbuf BYTES] [--stall-rcvbuf BYTES] [--header 'Name: value'] [--abort-on-quit 0|1]\n");
    exit(2);
}

int main(int argc, char **argv) {
    const char *ports_arg = NULL, *streams_arg = NULL;
    for (int a = 1; a < argc; a++) {
        const char *k = argv[a];
        if (a + 1 >= argc) usage();
        const char *v = argv[++a];
        if (!strcmp(k, "--clients")) n_clients = atoi(v);
        else if (!strcmp(k, "--ports")) ports_arg = v;
        else if (!strcmp(k, "--streams")) streams_arg = v;
        else if (!strcmp(k, "--host")) host = v;
        else if (!strcmp(k, "--path-prefix")) path_prefix = v;
        else if (!strcmp(k, "--per-src")) per_src = atoi(v);
        else if (!strcmp(k, "--src-offset")) src_offset = atoi(v);
        else if (!strcmp(k, "--concurrency")) concurrency = atoi(v);
        else if (!strcmp(k, "--connect-timeout")) connect_timeout_s = atof(v);
        else if (!strcmp(k, "--stall-fraction")) stall_fraction = atof(v);
        else if (!strcmp(k, "--rcvbuf")) rcvbuf = atoi(v);
        else if (!strcmp(k, "--stall-rcvbuf")) stall_rcvbuf = atoi(v);
        else if (!strcmp(k, "--header")) extra_header = v;
        else if (!strcmp(k, "--abort-on-quit")) abort_on_quit = atoi(v);
        else usage();
    }
    if (n_clients <= 0 || !ports_arg || !streams_arg || per_src <= 0 || concurrency <= 0) usage();
    if (strncmp(host, "127.", 4) != 0) {
        fprintf(stderr, "loadgen: only loopback (127.0.0.0/8) targets are allowed\n");
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    streams = split_csv(streams_arg, &n_streams);
    int np = 0;
    char **port_strs = split_csv(ports_arg, &np);
    n_ports = np;
    ports = calloc((size_t)n_ports, sizeof(int));
    for (int p = 0; p < n_ports; p++) ports[p] = atoi(port_strs[p]);
    if (n_streams == 0 || n_ports == 0) usage();
    raise_nofile(n_clients + 64);
    clients = calloc((size_t)n_clients, sizeof(client_t));
    readbuf = malloc(READBUF_SIZE);
    /* Stalled clients are spread evenly: within each run of 1/f consecutive stream cycles, the last one stalls,
       so every stream has the same share of stalled clients. */
    int stall_every = stall_fraction > 0 ? (int)(1.0 / stall_fraction + 0.5) : 0;
    for (int i = 0; i < n_clients; i++) {
        clients[i].fd = -1;
        clients[i].stream = (uint16_t)(i % n_streams);
        clients[i].port_index = (uint16_t)((i / n_streams) % n_ports);
        clients[i].stalled = stall_every > 0 && ((i / n_streams) % stall_every) == stall_every - 1;
    }
    epfd = epoll_create1(EPOLL_CLOEXEC);
    fcntl(0, F_SETFL, fcntl(0, F_GETFL) | O_NONBLOCK);
    struct epoll_event sev = {.events = EPOLLIN, .data.u32 = UINT32_MAX};
    epoll_ctl(epfd, EPOLL_CTL_ADD, 0, &sev);

    connect_all("connected");

    struct epoll_event evs[1024];
    char cmd[4096];
    size_t cmd_len = 0;
    for (;;) {
        int n = epoll_wait(epfd, evs, 1024, 200);
        if (n < 0 && errno != EINTR) { perror("epoll_wait"); return 3; }
        int stdin_ready = 0;
        for (int k = 0; k < n; k++) {
            if (evs[k].data.u32 == UINT32_MAX) stdin_ready = 1;
            else handle_event(&evs[k]);
        }
        if (!stdin_ready) continue;
        ssize_t r = read(0, cmd + cmd_len, sizeof cmd - 1 - cmd_len);
        if (r == 0) break; /* the orchestrator went away: stop */
        if (r < 0) continue;
        cmd_len += (size_t)r;
        char *line_start = cmd, *nl;
        while ((nl = memchr(line_start, '\n', cmd_len - (size_t)(line_start - cmd)))) {
            *nl = 0;
            if (!strcmp(line_start, "stats")) print_stats();
            else if (!strcmp(line_start, "histogram")) print_histogram();
            else if (!strcmp(line_start, "reset")) { reset_stats(); printf("{\"event\":\"reset\"}\n"); fflush(stdout); }
            else if (!strcmp(line_start, "reconnect")) connect_all("reconnected");
            else if (!strcmp(line_start, "quit")) goto done;
            line_start = nl + 1;
        }
        cmd_len -= (size_t)(line_start - cmd);
        memmove(cmd, line_start, cmd_len);
        if (cmd_len >= sizeof cmd - 1) cmd_len = 0;
    }
done:
    for (int i = 0; i < n_clients; i++) {
        if (clients[i].fd < 0) continue;
        if (abort_on_quit) {
            struct linger abort_now = {1, 0};
            setsockopt(clients[i].fd, SOL_SOCKET, SO_LINGER, &abort_now, sizeof abort_now);
        }
        close(clients[i].fd);
    }
    printf("{\"event\":\"bye\"}\n");
    fflush(stdout);
    return 0;
}
