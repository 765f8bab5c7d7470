"""Runs on the board, not here: ``dyvedeep remote setup`` sends this file to the board's system
Python on stdin (``python3 - WORKDIR VERSION SDIST BUILD_REQS ORT_REQ KEEP``). It makes the
engine's virtual environment ``WORKDIR/venvs/VERSION`` under a lock, pip installs the build
requirements, the engine's source distribution and (if it can) onnxruntime, keeps the newest KEEP
builds, and prints one JSON line: version, machine, python, onnxruntime, build_seconds, built.

Standard library only, and without side effects on import (the work happens in ``main``), so
that it is linted like any module of the package."""
import fcntl
import json
import os
import platform
import shutil
import subprocess
import sys
import time


def sh(*cmd, check=True):
    """Run ``cmd`` with its output on stderr; exit with its status when it fails and ``check``."""
    print("[board] $ " + " ".join(cmd), file=sys.stderr, flush=True)
    code = subprocess.call(cmd, stdout=sys.stderr)
    if check and code != 0:
        print("[board] %s failed with exit %d" % (os.path.basename(cmd[0]) if len(cmd) < 3 else " ".join(cmd[1:4]), code), file=sys.stderr)
        sys.exit(code or 1)
    return code


def main():
    """Build (or find) the engine ``VERSION`` and print what was found or done as JSON."""
    workdir, version, sdist, build_reqs, ort_req = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4].split(), sys.argv[5]
    keep = int(sys.argv[6])
    venv = os.path.join(workdir, "venvs", version)
    marker = os.path.join(venv, ".dyvedeep-ready")
    os.makedirs(os.path.dirname(venv), exist_ok=True)
    lock = open(venv + ".lock", "w")  # held until exit: one build of a version at a time
    fcntl.flock(lock, fcntl.LOCK_EX)
    if os.path.exists(marker):
        with open(marker) as fh:
            info = json.load(fh)
        info["built"] = False
        print(json.dumps(info))
        sys.exit(0)
    started = time.time()
    shutil.rmtree(venv, ignore_errors=True)
    py = os.path.join(venv, "bin", "python")
    # Without its own pip the venv is made in a fraction of a second (the system pip, seen through
    # the system site packages, installs into it); with pip where the system has none.
    sh(sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", venv)
    if sh(py, "-m", "pip", "--version", check=False) != 0:
        shutil.rmtree(venv, ignore_errors=True)
        sh(sys.executable, "-m", "venv", "--system-site-packages", venv)
    pip = [py, "-m", "pip", "--disable-pip-version-check", "--no-input", "install", "--progress-bar", "off"]
    if build_reqs:
        sh(*pip, *build_reqs)
    sh(*pip, "--no-build-isolation", sdist)
    ort = sh(*pip, ort_req, check=False) == 0 if ort_req else False
    if ort and sh(py, "-c", "import onnxruntime", check=False) != 0:
        # installed but unusable here (e.g. it crashes under qemu): remove it, bench then skips it
        sh(py, "-m", "pip", "uninstall", "-y", "--disable-pip-version-check", "onnxruntime", check=False)
        ort = False
    sh(os.path.join(venv, "bin", "dyvedeep"), "--version")
    info = {"version": version, "machine": platform.machine(), "python": platform.python_version(),
            "onnxruntime": ort, "build_seconds": round(time.time() - started, 1)}
    with open(marker + ".tmp", "w") as fh:
        json.dump(info, fh)
    os.replace(marker + ".tmp", marker)
    # Keep the newest KEEP engine builds; older ones (and their sources) go.
    root = os.path.dirname(venv)
    built = sorted((os.path.getmtime(os.path.join(root, d, ".dyvedeep-ready")), d) for d in os.listdir(root)
                   if os.path.isfile(os.path.join(root, d, ".dyvedeep-ready")))
    unfinished = []
    for d in os.listdir(root):  # failed builds of other versions, unless one is under way
        if os.path.isdir(os.path.join(root, d)) and d != version and not os.path.exists(os.path.join(root, d, ".dyvedeep-ready")):
            with open(os.path.join(root, d + ".lock"), "w") as other:
                try:
                    fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    continue
                unfinished.append((0, d))
    for _, old in built[:-keep] + unfinished:
        print("[board] removing old engine build " + old, file=sys.stderr)
        shutil.rmtree(os.path.join(root, old), ignore_errors=True)
        for stale in (os.path.join(root, old + ".lock"),
                      os.path.join(workdir, "sdist", "dyvedeep-%s.tar.gz" % old)):
            if os.path.exists(stale):
                os.remove(stale)
    info["built"] = True
    print(json.dumps(info))


if __name__ == "__main__":
    main()
