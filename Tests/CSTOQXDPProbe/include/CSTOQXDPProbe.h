/*
 * CSTOQXDPProbe (tests only): runs the real bpf/stoq_xdp.bpf.o through BPF_PROG_TEST_RUN
 * and says which worker it steered a QUIC datagram to, so that a Swift test can hold the
 * XDP program's reading of the CID layout against the other steering points.
 *
 * Why C: libbpf is a C API and the frame is built byte by byte. Needs CAP_BPF (root).
 */
#ifndef CSTOQXDPPROBE_H
#define CSTOQXDPPROBE_H

#include <stddef.h>
#include <stdint.h>

typedef struct stoq_xdp_probe stoq_xdp_probe;

/** Loads `object` (its maps unpinned) steering by CID over `workers` sockets (1 … 8) for
 *  UDP port `port`. NULL with `err` on failure. */
stoq_xdp_probe *stoq_xdp_probe_open(const char *object, uint32_t workers, uint16_t port, char *err, size_t errlen);
/** Runs `payload` as the UDP payload of an Ethernet/IPv6 frame to the port. Returns the
 *  worker the program steered it to by CID, -1 when it did not steer by CID, or <= -1000
 *  when the run itself failed. */
int stoq_xdp_probe_worker(stoq_xdp_probe *p, const uint8_t *payload, size_t len);
void stoq_xdp_probe_close(stoq_xdp_probe *p);

#endif
