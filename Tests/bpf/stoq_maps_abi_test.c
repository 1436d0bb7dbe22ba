/*
 * Map layout versions (STOQ_MAP_ABI_VERSION, bpf/stoq_kern_user.h): maps pinned by a build of
 * another version are refused, naming the pin, both versions and what to run, by CSTOQXDP's
 * stoq_xdp_check_maps (which a socket's open, the stats and the shed plan go through; linked in
 * by Tests/bpf/run) and by libbpf when this build's program would reuse them. Pins under a
 * directory of its own in /sys/fs/bpf, removed at the end. Needs root.
 * Usage: stoq_maps_abi_test <stoq_xdp.bpf.o>
 */
#include <bpf/bpf.h>
#include <bpf/libbpf.h>
#include <dirent.h>
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "CSTOQXDP.h"

static int passed, failed;

static void expect(const char *name, int ok) {
  printf("%s %s\n", ok ? "ok  " : "FAIL", name);
  if (ok) passed++;
  else failed++;
}

/* An error message, compared whole; prints both when they differ. */
static int same_text(const char *got, const char *want) {
  if (strcmp(got, want) == 0) return 1;
  fprintf(stderr, "  got:  %s\n  want: %s\n", got, want);
  return 0;
}

/* Removes pin directory `dir` and whatever is pinned in it. */
static void remove_pins(const char *dir) {
  DIR *d = opendir(dir);
  if (!d) return;
  char path[512];
  for (struct dirent *e; (e = readdir(d));) {
    if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0) continue;
    snprintf(path, sizeof(path), "%s/%s", dir, e->d_name);
    unlink(path);
  }
  closedir(d);
  rmdir(dir);
}

/* Pins an empty map `name` of `type` and `entries` at DIR/name. 0 or -1. */
static int pin_map(const char *dir, const char *name, enum bpf_map_type type, unsigned entries) {
  char path[512];
  snprintf(path, sizeof(path), "%s/%s", dir, name);
  int fd = bpf_map_create(type, name, 4, 4, entries, NULL);
  int rc = fd >= 0 ? bpf_obj_pin(fd, path) : -1;
  if (fd >= 0) close(fd);
  return rc;
}

/* Loads `object` with its maps pinned by name under `dir` (what xdp-loader -p does), reusing
 * what is pinned there already. 0, or libbpf's error. */
static int load_pinned(const char *object, const char *dir) {
  LIBBPF_OPTS(bpf_object_open_opts, opts, .pin_root_path = dir);
  struct bpf_object *obj = bpf_object__open_file(object, &opts);
  if (!obj) return -errno;
  int rc = bpf_object__load(obj);
  bpf_object__close(obj); /* the pins stay */
  return rc;
}

int main(int argc, char **argv) {
  if (argc < 2) {
    fprintf(stderr, "usage: %s stoq_xdp.bpf.o\n", argv[0]);
    return 2;
  }
  const char *object = argv[1];
  /* libbpf's own complaint about the reuse it refuses is expected below: keep it quiet. */
  libbpf_set_print(NULL);
  char root[64], same[96], other[96], old[96], none[96], err[512], want[512], name[160];
  snprintf(root, sizeof(root), "/sys/fs/bpf/stoq-abi-test-%d", (int)getpid());
  snprintf(same, sizeof(same), "%s/eth-same", root);
  snprintf(other, sizeof(other), "%s/eth-other", root);
  snprintf(old, sizeof(old), "%s/eth-old", root);
  snprintf(none, sizeof(none), "%s/eth-none", root);
  if (mkdir(root, 0700) || mkdir(same, 0700) || mkdir(other, 0700) || mkdir(old, 0700) || mkdir(none, 0700)) {
    fprintf(stderr, "mkdir under /sys/fs/bpf: %s (bpffs mounted? root?)\n", strerror(errno));
    remove_pins(same), remove_pins(other), remove_pins(old), remove_pins(none), rmdir(root);
    return 1;
  }

  /* The program's own pins: accepted, and reused by the same program. */
  expect("the program pins its maps, stoq_abi among them", load_pinned(object, same) == 0);
  snprintf(name, sizeof(name), "maps this build pinned are version %d and accepted", STOQ_MAP_ABI_VERSION);
  expect(name, stoq_xdp_check_maps(same, err, sizeof(err)) == 0);
  expect("this build's program reuses its own pins", load_pinned(object, same) == 0);

  /* A newer build's pins. */
  unsigned newer = STOQ_MAP_ABI_VERSION + 1;
  pin_map(other, STOQ_MAP_ABI, BPF_MAP_TYPE_ARRAY, newer);
  pin_map(other, STOQ_MAP_XSK, BPF_MAP_TYPE_XSKMAP, STOQ_MAX_SOCKETS);
  int rc = stoq_xdp_check_maps(other, err, sizeof(err));
  snprintf(want, sizeof(want),
           "map ABI: %s/stoq_abi: the pinned maps are layout version %u, this build's is %u: detach and attach with "
           "this build (scripts/xdp-attach --detach eth-other; scripts/xdp-attach eth-other --ports …), or run the "
           "build that attached them",
           other, newer, STOQ_MAP_ABI_VERSION);
  expect("another version's pins are refused (-EPROTO), naming the pin, both versions and what to run",
         rc == -EPROTO && same_text(err, want));
  uint64_t stats[STOQ_STAT_MAX];
  expect("their counters are not read (-EPROTO)", stoq_xdp_read_stats(other, stats, STOQ_STAT_MAX) == -EPROTO);
  struct stoq_shed_rule rule = {.prefix = 1, .shift = 1};
  err[0] = 0;
  expect("no shed plan is written into them",
         stoq_xdp_shed_initials(other, 0, &rule, 1, 1, err, sizeof(err)) == -1 && same_text(err, want));
  expect("this build's program does not reuse them (libbpf: stoq_abi's size differs)", load_pinned(object, other) != 0);

  /* Pins from before versions: maps, no stoq_abi. */
  pin_map(old, STOQ_MAP_XSK, BPF_MAP_TYPE_XSKMAP, STOQ_MAX_SOCKETS);
  rc = stoq_xdp_check_maps(old, err, sizeof(err));
  snprintf(want, sizeof(want),
           "map ABI: %s/stoq_abi: the pinned maps are layout version 0 (missing: a build from before versions), this "
           "build's is %u: detach and attach with this build (scripts/xdp-attach --detach eth-old; scripts/xdp-attach "
           "eth-old --ports …), or run the build that attached them",
           old, STOQ_MAP_ABI_VERSION);
  expect("pins without a version are refused (-EPROTO)", rc == -EPROTO && same_text(err, want));

  /* Nothing pinned: not a version question. */
  rc = stoq_xdp_check_maps(none, err, sizeof(err));
  snprintf(want, sizeof(want), "map ABI: %s/stoq_abi: nothing pinned (attach with scripts/xdp-attach eth-none)", none);
  expect("nothing pinned -> -ENOENT, naming the attach", rc == -ENOENT && same_text(err, want));

  remove_pins(same);
  remove_pins(other);
  remove_pins(old);
  remove_pins(none);
  expect("pins removed", rmdir(root) == 0);

  printf("bpf maps ABI: %d passed, %d failed\n", passed, failed);
  return failed ? 1 : 0;
}
