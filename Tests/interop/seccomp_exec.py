"""Loads a seccomp profile (the OCI/Kubernetes JSON of deploy/kubernetes/seccomp.yaml: a
default errno action and one allow list) and execs a command under it, as a container runtime
would. Run by Debian's python3 (python3-seccomp, libseccomp's bindings):
    /usr/bin/python3 seccomp_exec.py PROFILE.json -- CMD ARGS…
Needs no_new_privs or CAP_SYS_ADMIN, like any seccomp filter."""
import json
import os
import sys

import seccomp

profile_path, cmd = sys.argv[1], sys.argv[sys.argv.index("--") + 1:]
with open(profile_path) as f:
    profile = json.load(f)
assert profile["defaultAction"] == "SCMP_ACT_ERRNO", profile["defaultAction"]
flt = seccomp.SyscallFilter(defaction=seccomp.ERRNO(profile.get("defaultErrnoRet", 1)))
unknown = []
for rule in profile["syscalls"]:
    assert rule["action"] == "SCMP_ACT_ALLOW", rule["action"]
    for name in rule["names"]:
        try:
            flt.add_rule(seccomp.ALLOW, name)
        except (RuntimeError, ValueError):
            unknown.append(name)  # not a syscall on this architecture: runtimes skip these too
flt.load()
os.execvp(cmd[0], cmd)
