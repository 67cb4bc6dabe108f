#!/usr/bin/env bash
# Check a 64-bit Raspberry Pi install without a Pi: build a Debian bookworm arm64 root with debootstrap, install
# our wheel there with pip from PyPI, classify the sample cells (and a whole field, when the code has the field
# path) under qemu-user emulation of a Pi's CPU, and diff the rows against the same run on this x86_64 host.
# Writes docs/pi_check/report.md and report.json.
#
# Usage (as root; needs network to a Debian mirror and to the package index pip is configured for):
#   scripts/pi_check.sh [--root DIR] [--out DIR] [--field IMAGE]... [--cpus "cortex-a72 ..."] [--no-tflite-runtime]
#                       [--rebuild-root] [--fresh-venvs] [--wheels-from host|pypi] [--no-bundle]
#
#   --root DIR           where the arm64 root and venvs are built once and reused (default $PI_ROOT, else
#                        ~/.cache/malaria-edge/pi-root)
#   --out DIR            where the report goes (default docs/pi_check in the repo)
#   --field IMAGE        classify this whole field image (copied into the root, never into the repo); default:
#                        samples/fields/ in the repo if present, else the first IML test-split field of the IML
#                        images folder given by --iml DIR or $IML_FIELDS (the shared data), if any
#   --iml DIR            the IML fields' images folder (default $IML_FIELDS; none: no IML field)
#   --mirror URL         the Debian mirror for debootstrap (default $DEBIAN_MIRROR, else the first Debian mirror
#                        in this host's apt sources)
#   --cpus LIST          CPUs qemu emulates for the base install (default "cortex-a72 cortex-a76 cortex-a53":
#                        Pi 4, Pi 5, Pi 3 / Zero 2 W); the first one runs everything else
#   --no-tflite-runtime  skip the arm64 venv that has tflite-runtime instead of ai-edge-litert
#   --rebuild-root       delete the cached root and build it again
#   --fresh-venvs        recreate every venv (default: reuse one whose requirements did not change)
#   --wheels-from WHERE  host (default): pip on this host downloads the aarch64 wheels from PyPI for the root's
#                        Python and glibc, and pip in the root resolves and installs from them offline; pypi: pip
#                        in the root downloads from PyPI itself, as a Pi does (slow TLS under emulation; this
#                        sandbox's egress proxy resets such slow downloads under load)
#   --no-bundle          skip the offline bundle: by default edge-bundle (on this host, from PyPI) writes the aarch64
#                        bundle a field device gets, its tar.gz is unpacked in the root, and its install.sh installs
#                        and the installed edge-classify classifies the cells and fields inside a network namespace
#                        with no interface (unshare --net), rows diffed like every other run
#
# Slow (arm64 is emulated), so it is not part of every CI run: on 2 shared cores a first run takes ~15-25 min
# (debootstrap 7-12), a cached run ~5-8 min (the bundle ~3 of it), depending on load; the report says how long.
set -euo pipefail
{  # the whole script is one block, so bash has read all of it before running any (safe to edit while it runs)

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
ROOT=${PI_ROOT:-${XDG_CACHE_HOME:-$HOME/.cache}/malaria-edge/pi-root}
OUT=$REPO/docs/pi_check
FIELDS=()
CPUS="cortex-a72 cortex-a76 cortex-a53"
WITH_TFLITE_RUNTIME=1
REBUILD_ROOT=0
FRESH_VENVS=0
WHEELS_FROM=host
WITH_BUNDLE=1
SUITE=bookworm
MIRROR=${DEBIAN_MIRROR:-}
IML=${IML_FIELDS:-}

die() { echo "pi_check: $*" >&2; exit 1; }

while [ $# -gt 0 ]; do
    case "$1" in
        --root) ROOT=$2; shift 2 ;;
        --out) OUT=$2; shift 2 ;;
        --field) FIELDS+=("$2"); shift 2 ;;
        --iml) IML=$2; shift 2 ;;
        --mirror) MIRROR=$2; shift 2 ;;
        --cpus) CPUS=$2; shift 2 ;;
        --no-tflite-runtime) WITH_TFLITE_RUNTIME=0; shift ;;
        --rebuild-root) REBUILD_ROOT=1; shift ;;
        --fresh-venvs) FRESH_VENVS=1; shift ;;
        --wheels-from) WHEELS_FROM=$2; shift 2 ;;
        --no-bundle) WITH_BUNDLE=0; shift ;;
        -h|--help) sed -n '2,35p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
done

if [ -z "$MIRROR" ]; then  # this host's own Debian mirror, from its apt sources (one-line or deb822 format)
    MIRROR=$(grep -rhoE '^(deb|URIs:)[[:space:]]+(\[[^]]*\][[:space:]]+)?https?://[^[:space:]]+/debian/?' \
        /etc/apt/sources.list /etc/apt/sources.list.d 2>/dev/null | grep -oE 'https?://[^[:space:]]+' | head -1 || true)
    [ -n "$MIRROR" ] || die "no Debian mirror in this host's apt sources; pass --mirror URL or set DEBIAN_MIRROR"
fi
[ "$(id -u)" = 0 ] || die "needs root (debootstrap, mount, chroot); run it with sudo"
[ "$(uname -m)" = x86_64 ] || die "meant for an x86_64 host (found $(uname -m)); on an arm64 board just pip install the wheel"
ROOT=$(realpath -m "$ROOT")
CHECK=$ROOT/opt/pi-check
RUNS=$CHECK/runs
case "$ROOT" in /|"$HOME"|/home|/usr|/var|/tmp|"$REPO"|"$REPO"/*) die "--root $ROOT is not a safe place for a throwaway root" ;; esac
for field in "${FIELDS[@]+"${FIELDS[@]}"}"; do [ -f "$field" ] || die "--field $field: no such file"; done
case "$WHEELS_FROM" in host|pypi) ;; *) die "--wheels-from is host or pypi, not $WHEELS_FROM" ;; esac
read -r -a CPU_LIST <<<"$CPUS"
[ ${#CPU_LIST[@]} -gt 0 ] || die "--cpus needs at least one CPU (qemu-aarch64-static -cpu help lists them)"
MAIN_CPU=${CPU_LIST[0]}
# Each Pi core as its 64-bit kernel reports it in /proc/cpuinfo: variant, part number, revision; features.
declare -A CPU_PART=([cortex-a53]="0x0 0xd03 4" [cortex-a72]="0x0 0xd08 3" [cortex-a76]="0x4 0xd0b 1")
declare -A CPU_FEATURES=([cortex-a53]="fp asimd evtstrm crc32 cpuid" [cortex-a72]="fp asimd evtstrm crc32 cpuid"
    [cortex-a76]="fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp")
for cpu in "${CPU_LIST[@]}"; do
    [ -n "${CPU_PART[$cpu]:-}" ] || die "--cpus: no Pi core profile for $cpu (known: ${!CPU_PART[*]})"
done

RUN_START=$(date +%s.%N)
seconds_since() { python3 -c "import sys, time; print(f'{time.time() - float(sys.argv[1]):.1f}')" "$1"; }
PHASES=()
phase_done() { PHASES+=("$1=$(seconds_since "$2")"); echo "pi_check: $1 done in $(seconds_since "$2") s" >&2; }

# 1. Tools from Debian's packages, and qemu-aarch64 registered with binfmt_misc so arm64 binaries run in a chroot.
t=$(date +%s.%N)
missing=()
command -v debootstrap >/dev/null || missing+=(debootstrap)
command -v qemu-aarch64-static >/dev/null || missing+=(qemu-user-static)
command -v update-binfmts >/dev/null || missing+=(binfmt-support)
if [ ${#missing[@]} -gt 0 ]; then
    echo "pi_check: installing ${missing[*]} from Debian" >&2
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap qemu-user-static binfmt-support >/dev/null
fi
if [ ! -e /proc/sys/fs/binfmt_misc/register ]; then
    mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc \
        || die "cannot mount binfmt_misc (a container without that privilege?); run on a VM or host that allows it"
fi
if [ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]; then
    update-binfmts --enable qemu-aarch64 2>/dev/null || update-binfmts --import qemu-aarch64 \
        || die "cannot register qemu-aarch64 with binfmt_misc (update-binfmts failed)"
fi
grep -q '^flags:.*F' /proc/sys/fs/binfmt_misc/qemu-aarch64 \
    || die "qemu-aarch64 is registered without the F flag, so it cannot run inside a chroot; reinstall qemu-user-static"
phase_done tools "$t"

# 2. The arm64 root, built once and reused. A root without the stamp is a half-built one: start it again.
STAMP=$ROOT/.pi-check-root
unmount_root() {
    for m in proc/cpuinfo sys dev/pts dev proc; do ! mountpoint -q "$ROOT/$m" || umount -l "$ROOT/$m" || true; done
}
if [ "$REBUILD_ROOT" = 1 ] || { [ -e "$ROOT" ] && [ ! -f "$STAMP" ]; }; then
    [ ! -e "$ROOT" ] || [ -d "$ROOT/debootstrap" ] || [ -f "$STAMP" ] || [ -z "$(ls -A "$ROOT")" ] \
        || die "$ROOT exists and is not a root this script built; pass another --root"
    unmount_root
    rm -rf --one-file-system "$ROOT"
fi
ROOT_BUILT_NOW=0
if [ ! -f "$STAMP" ]; then
    t=$(date +%s.%N)
    echo "pi_check: building a Debian $SUITE arm64 root in $ROOT (debootstrap under qemu, ~12 min)" >&2
    mkdir -p "$ROOT"
    nice -n 10 debootstrap --arch=arm64 --variant=minbase \
        --include=python3,python3-venv,python3-pip,ca-certificates "$SUITE" "$ROOT" "$MIRROR" >"$ROOT.debootstrap.log" 2>&1 \
        || die "debootstrap failed; see $ROOT.debootstrap.log"
    echo "built_seconds=$(seconds_since "$t") built_at=$(date -u +%Y-%m-%dT%H:%M:%SZ) suite=$SUITE" >"$STAMP"
    ROOT_BUILT_NOW=1
    phase_done root_build "$t"
fi

cp /etc/resolv.conf "$ROOT/etc/resolv.conf"
# pip in the root trusts the host's CA bundle: a network that intercepts TLS (like this sandbox's) has its CA there.
HOST_CA=${PIP_CERT:-${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}}
[ -f "$HOST_CA" ] && cp "$HOST_CA" "$ROOT/etc/ssl/certs/host-ca-bundle.crt"
trap unmount_root EXIT
mountpoint -q "$ROOT/proc" || mount -t proc proc "$ROOT/proc"
mountpoint -q "$ROOT/dev" || mount --bind /dev "$ROOT/dev"
mountpoint -q "$ROOT/dev/pts" || mount --bind /dev/pts "$ROOT/dev/pts"
mountpoint -q "$ROOT/sys" || mount -t sysfs sysfs "$ROOT/sys"

# qemu-user shows the guest this host's /proc/cpuinfo (x86). cpuinfo, which XNNPACK uses to pick its kernels, then
# finds no ARM core: without /sys it fails and the interpreter silently falls back to TFLite's built-in kernels; with
# /sys it crashes. So each emulated CPU gets the /proc/cpuinfo of that Pi's core (part number and features as its
# 64-bit kernel reports them), bound over the root's /proc/cpuinfo; the features qemu emulates match them.
N_CORES=$(python3 -c "import sys; a, _, b = open('/sys/devices/system/cpu/possible').read().strip().split(',')[0].partition('-'); print(int(b or a) + 1)")
mkdir -p "$CHECK/cpuinfo"
for cpu in "${CPU_LIST[@]}"; do
    read -r variant part revision <<<"${CPU_PART[$cpu]}"
    for ((i = 0; i < N_CORES; i++)); do
        printf 'processor\t: %d\nBogoMIPS\t: 108.00\nFeatures\t: %s\nCPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: %s\nCPU part\t: %s\nCPU revision\t: %s\n\n' \
            "$i" "${CPU_FEATURES[$cpu]}" "$variant" "$part" "$revision"
    done >"$CHECK/cpuinfo/$cpu"
done
bind_cpuinfo() {  # bind_cpuinfo CPU: the root's /proc/cpuinfo becomes that core's
    cmp -s "$ROOT/proc/cpuinfo" "$CHECK/cpuinfo/$1" && return
    ! mountpoint -q "$ROOT/proc/cpuinfo" || umount "$ROOT/proc/cpuinfo"
    mount --bind "$CHECK/cpuinfo/$1" "$ROOT/proc/cpuinfo"
}

# Run a command in the arm64 root, niced, with a clean environment (no host pip settings leak in), qemu emulating
# the CPU named in $QEMU_CPU (each exec starts a new qemu, so the variable must survive env -i). NET_WRAP=(unshare
# --net) runs it in a new network namespace: no interface but a loopback that is down, as on a device offline.
QEMU_CPU=$MAIN_CPU
PIP_SOURCE_ENV=()
[ "$WHEELS_FROM" = host ] && PIP_SOURCE_ENV=(PIP_NO_INDEX=1 PIP_FIND_LINKS=/opt/pi-check/wheelhouse)
NET_WRAP=()
in_root() {
    bind_cpuinfo "$QEMU_CPU"
    QEMU_CPU=$QEMU_CPU "${NET_WRAP[@]}" chroot "$ROOT" /usr/bin/env -i QEMU_CPU="$QEMU_CPU" HOME=/root LANG=C.UTF-8 \
        PATH=/usr/local/bin:/usr/bin:/bin PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_DEFAULT_TIMEOUT=120 \
        PIP_CERT=/etc/ssl/certs/host-ca-bundle.crt PIP_ROOT_USER_ACTION=ignore "${PIP_SOURCE_ENV[@]}" \
        /bin/sh -c 'cd /opt/pi-check/inputs 2>/dev/null || cd /; exec nice -n 10 "$@"' sh "$@"
}
[ "$(in_root uname -m)" = aarch64 ] || die "the root does not run as aarch64 under qemu"

# 3. Our wheel, built on the host from a copy of the files git knows (tracked or not ignored), so the repo gets
# no build/ or egg-info.
t=$(date +%s.%N)
rm -rf "$CHECK/dist" "$CHECK/inputs" "$RUNS"
mkdir -p "$CHECK/dist" "$CHECK/inputs" "$RUNS" "$CHECK/tools"
: >"$RUNS/notes.txt"
echo "Under qemu-user the guest reads this host's /proc/cpuinfo (x86), and a bare chroot has no /sys: XNNPACK's CPU detection then fails and the interpreter silently falls back to TFLite's built-in kernels, whose int8 outputs differ from x86_64 (BUILTIN_WITHOUT_DEFAULT_DELEGATES in the kernel table), or, with /sys, crashes. The script mounts sysfs and binds the /proc/cpuinfo of each emulated Pi core, so XNNPACK starts as on the Pi ('+ XNNPACK' in the table: the run logged its delegate; '+ XNNPACK (venv probe)': edge-classify, which keeps that log line off stderr, ran in a venv whose interpreter logged it when the int8 model was loaded on its own, on the first emulated core)." >>"$RUNS/notes.txt"
cp "$REPO/scripts/pi_check_report.py" "$CHECK/tools/"
HOST_PY=python3
[ -x "$REPO/.venv/bin/python" ] && HOST_PY=$REPO/.venv/bin/python
BUILD_TMP=$(mktemp -d)
mkdir "$BUILD_TMP/src"
(cd "$REPO" && git ls-files -z --cached --others --exclude-standard | xargs -0 sh -c \
    'for f; do [ -e "$f" ] && printf "%s\0" "$f"; done' sh | tar --null -T - -cf -) | tar -C "$BUILD_TMP/src" -xf -
(cd "$BUILD_TMP" && "$HOST_PY" -m pip wheel -q --no-deps -w "$CHECK/dist" ./src) >"$RUNS/wheel.log" 2>&1 \
    || die "pip wheel failed: $(tail -3 "$RUNS/wheel.log")"
rm -rf "$BUILD_TMP"
WHEEL=$(ls "$CHECK"/dist/*.whl)
WHEEL_NAME=$(basename "$WHEEL")
HAS_FIELDS_EXTRA=$(python3 -c "import sys, zipfile; z = zipfile.ZipFile(sys.argv[1]); m = [n for n in z.namelist() if n.endswith('.dist-info/METADATA')][0]; print(int('Provides-Extra: fields' in z.read(m).decode()))" "$WHEEL")
REQS_KEY=$(python3 -c "import hashlib, sys, zipfile; z = zipfile.ZipFile(sys.argv[1]); m = [n for n in z.namelist() if n.endswith('.dist-info/METADATA')][0]; print(hashlib.sha256(''.join(l for l in z.read(m).decode().splitlines(True) if l.startswith(('Requires-Dist', 'Provides-Extra'))).encode()).hexdigest()[:16])" "$WHEEL")
phase_done wheel "$t"

# The aarch64 wheels, fetched from PyPI by pip on this host for the root's Python and glibc (with --wheels-from host).
PY_TAG=$(in_root python3 -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
GLIBC_MINOR=$(in_root python3 -c 'import platform; print(platform.libc_ver()[1].split(".")[1])')
if [ "$WHEELS_FROM" = host ]; then
    t=$(date +%s.%N)
    mkdir -p "$CHECK/wheelhouse"
    platforms=(--platform manylinux2014_aarch64)
    for minor in $(seq 17 "$GLIBC_MINOR"); do platforms+=(--platform "manylinux_2_${minor}_aarch64"); done
    wanted=("$WHEEL")
    [ "$HAS_FIELDS_EXTRA" = 1 ] && wanted=("$WHEEL[fields]")
    [ "$WITH_TFLITE_RUNTIME" = 1 ] && wanted+=(tflite-runtime 'numpy<2')
    for req in "${wanted[@]}"; do
        "$HOST_PY" -m pip download --isolated --cert "${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}" \
            --retries 5 -q --only-binary=:all: "${platforms[@]}" \
            --python-version "$PY_TAG" --implementation cp -d "$CHECK/wheelhouse" "$req" >>"$RUNS/wheelhouse.log" 2>&1 \
            || die "pip download of the aarch64 wheels for $req failed: $(tail -2 "$RUNS/wheelhouse.log")"
    done
    rm -f "$CHECK/wheelhouse/$WHEEL_NAME"
    echo "The arm64 venvs were installed by pip inside the root (its own resolver and platform tags) from aarch64 wheels that pip on the x86_64 host downloaded from PyPI (--wheels-from host). pip in the root can reach PyPI itself (--wheels-from pypi; an earlier run installed the same versions that way), but on this loaded host its emulated downloads were reset by the sandbox's egress proxy." >>"$RUNS/notes.txt"
    phase_done wheelhouse "$t"
fi

# The inputs, with the same relative paths inside the root and on the host, so rows match by path.
mkdir -p "$CHECK/inputs/edge_runtime"
cp -r "$REPO/edge_runtime/samples" "$CHECK/inputs/edge_runtime/samples"
find "$CHECK/inputs" -name '__init__.py' -delete
INPUTS=(edge_runtime/samples)
FIELD_INPUTS=()
for dir in edge_runtime/sample_fields samples/fields; do  # bundled sample fields, copied with their relative path
    if [ -d "$REPO/$dir" ]; then
        mkdir -p "$CHECK/inputs/$(dirname "$dir")"
        cp -r "$REPO/$dir" "$CHECK/inputs/$dir"
        find "$CHECK/inputs/$dir" -name '__init__.py' -delete
        FIELD_INPUTS+=("$dir")
    fi
done
if [ ${#FIELDS[@]} -eq 0 ] && [ -n "$IML" ] && [ -d "$IML" ]; then
    # The shared split: sorted names, block = index // 8, block % 4 == 3 is test; the first test field.
    FIELDS+=("$IML/$(ls "$IML" | sort | sed -n 25p)")
fi
if [ ${#FIELDS[@]} -gt 0 ]; then
    mkdir -p "$CHECK/inputs/fields"
    for field in "${FIELDS[@]}"; do cp "$field" "$CHECK/inputs/fields/"; done
    FIELD_INPUTS+=(fields)
fi
echo "pi_check: inputs ${INPUTS[*]} ${FIELD_INPUTS[*]+${FIELD_INPUTS[*]}}" >&2

# 4. The venvs. Each is reused while its install commands and our wheel's requirements are unchanged (then only our
# wheel is reinstalled); otherwise it is created again and filled by pip from its configured index (inside the root)
# or from this host's configured indexes (x86_64).
ensure_venv() {  # ensure_venv NAME MACHINE INSTALL_SPEC... (arm64 venvs live in /opt/pi-check inside the root)
    local name=$1 machine=$2; shift 2
    local dir=$CHECK/venvs/$name key runner=() compile=()
    key="$REQS_KEY $WHEELS_FROM $*"
    # Byte-compiling every installed file is most of an emulated install; Python compiles what it imports anyway.
    [ "$machine" = arm64 ] && runner=(in_root) && compile=(--no-compile)
    local py=/opt/pi-check/venvs/$name/bin/python
    [ "$machine" = x86_64 ] && py=$dir/bin/python
    if [ "$FRESH_VENVS" = 0 ] && [ -f "$dir/.pi-check-key" ] && [ "$(cat "$dir/.pi-check-key")" = "$key" ]; then
        "${runner[@]}" "$py" -m pip install -q "${compile[@]}" --no-deps --force-reinstall "${WHEEL_PATH[$machine]}" >>"$RUNS/pip-$name.log" 2>&1 \
            || die "reinstalling our wheel in venv $name failed: $(tail -3 "$RUNS/pip-$name.log")"
        echo "pi_check: venv $name reused (requirements unchanged)" >&2
        return
    fi
    rm -rf "$dir"
    mkdir -p "$CHECK/venvs"
    if [ "$machine" = arm64 ]; then in_root python3 -m venv "/opt/pi-check/venvs/$name"; else python3 -m venv "$dir"; fi
    local spec
    for spec in "$@"; do
        # shellcheck disable=SC2086
        "${runner[@]}" "$py" -m pip install -q "${compile[@]}" ${spec//@WHEEL@/${WHEEL_PATH[$machine]}} >>"$RUNS/pip-$name.log" 2>&1 \
            || die "pip install ${spec//@WHEEL@/our wheel} in venv $name failed: $(tail -3 "$RUNS/pip-$name.log")"
    done
    echo "$key" >"$dir/.pi-check-key"
    VENVS_BUILT=$((VENVS_BUILT + 1))
}
VENVS_BUILT=0
declare -A WHEEL_PATH=([arm64]=/opt/pi-check/dist/$WHEEL_NAME [x86_64]=$WHEEL)
describe_venv() {  # describe_venv NAME MACHINE
    if [ "$2" = arm64 ]; then
        in_root "/opt/pi-check/venvs/$1/bin/python" /opt/pi-check/tools/pi_check_report.py describe
    else
        "$CHECK/venvs/$1/bin/python" "$CHECK/tools/pi_check_report.py" describe
    fi >"$RUNS/venv-$1.env.json"
}

t=$(date +%s.%N)
ensure_venv x86_64-base x86_64 "@WHEEL@"
describe_venv x86_64-base x86_64
if [ "$HAS_FIELDS_EXTRA" = 1 ]; then
    ensure_venv x86_64-fields x86_64 "@WHEEL@[fields]"
    describe_venv x86_64-fields x86_64
fi
phase_done host_venvs "$t"
t=$(date +%s.%N)
ensure_venv arm64-base arm64 "@WHEEL@"
describe_venv arm64-base arm64
phase_done arm64_venv_base "$t"
if [ "$HAS_FIELDS_EXTRA" = 1 ]; then
    t=$(date +%s.%N)
    ensure_venv arm64-fields arm64 "@WHEEL@[fields]"
    describe_venv arm64-fields arm64
    phase_done arm64_venv_fields "$t"
else
    echo "This code's wheel has no 'fields' extra (no field path yet), so no field was classified." >>"$RUNS/notes.txt"
fi

# 5. The runs: each writes runs/LABEL.csv, LABEL.summary.json and LABEL.meta.json (what ran, where, how long).
run_label() {  # run_label LABEL KIND MACHINE CPU VENV REFERENCE COMMAND...
    local label=$1 kind=$2 machine=$3 cpu=$4 venv=$5 reference=$6; shift 6
    local start rc=0
    start=$(date +%s.%N)
    "$@" 2>"$RUNS/$label.stderr" || rc=$?
    python3 -c "import json, sys; k = ['label', 'kind', 'machine', 'cpu', 'venv', 'reference', 'wall_seconds', 'exit_code']; v = sys.argv[1:]; d = dict(zip(k, v)); d['reference'] = d['reference'] or None; d['wall_seconds'] = float(d['wall_seconds']); d['exit_code'] = int(d['exit_code']); print(json.dumps(d))" \
        "$label" "$kind" "$machine" "$cpu" "$venv" "$reference" "$(seconds_since "$start")" "$rc" >"$RUNS/$label.meta.json"
    echo "pi_check: $label: exit $rc in $(seconds_since "$start") s" >&2
}
CELL_ARGS=(--threads 1 --compare --overwrite)
classify_cells() {  # classify_cells LABEL MACHINE CPU VENV REFERENCE [edge-classify options]
    local label=$1 machine=$2 cpu=$3 venv=$4 reference=$5; shift 5
    if [ "$machine" = arm64 ]; then
        QEMU_CPU=$cpu run_label "$label" cells arm64 "$cpu" "$venv" "$reference" in_root \
            "/opt/pi-check/venvs/$venv/bin/edge-classify" "${INPUTS[@]}" "${CELL_ARGS[@]}" "$@" \
            -o "../runs/$label.csv" --summary-json "../runs/$label.summary.json"
    else
        run_label "$label" cells x86_64 host "$venv" "$reference" sh -c 'cd "$0" && exec "$@"' "$CHECK/inputs" \
            "$CHECK/venvs/$venv/bin/edge-classify" "${INPUTS[@]}" "${CELL_ARGS[@]}" "$@" \
            -o "../runs/$label.csv" --summary-json "../runs/$label.summary.json"
    fi
}
# Whole fields: through edge-classify --input-kind field where the CLI has it (the rows carry each cell's box), and
# through the API helper, which also hashes the decoded field and every crop, to place a difference.
classify_fields() {  # classify_fields LABEL MACHINE CPU VENV REFERENCE
    local label=$1 machine=$2 cpu=$3 venv=$4 reference=$5
    local helper=(classify-fields "${FIELD_INPUTS[@]}" --threads 1 --output "../runs/$label.api.csv"
                  --summary-json "../runs/$label.fieldinputs.json")
    local cli=("${FIELD_INPUTS[@]}" --input-kind field --threads 1 --overwrite -o "../runs/$label.csv"
               --summary-json "../runs/$label.summary.json")
    if [ "$machine" = arm64 ]; then
        QEMU_CPU=$cpu run_label "$label" fields arm64 "$cpu" "$venv" "$reference" in_root \
            "/opt/pi-check/venvs/$venv/bin/edge-classify" "${cli[@]}"
        QEMU_CPU=$cpu in_root "/opt/pi-check/venvs/$venv/bin/python" /opt/pi-check/tools/pi_check_report.py \
            "${helper[@]}" 2>"$RUNS/$label.api.stderr" || true
    else
        run_label "$label" fields x86_64 host "$venv" "$reference" sh -c 'cd "$0" && exec "$@"' "$CHECK/inputs" \
            "$CHECK/venvs/$venv/bin/edge-classify" "${cli[@]}"
        (cd "$CHECK/inputs" && "$CHECK/venvs/$venv/bin/python" "$CHECK/tools/pi_check_report.py" "${helper[@]}") \
            2>"$RUNS/$label.api.stderr" || true
    fi
}

classify_cells cells-x86_64-base x86_64 host x86_64-base ""
t=$(date +%s.%N)
for cpu in "${CPU_LIST[@]}"; do
    classify_cells "cells-arm64-$cpu-base" arm64 "$cpu" arm64-base cells-x86_64-base
done
phase_done arm64_cells_base "$t"
if [ "$HAS_FIELDS_EXTRA" = 1 ]; then
    t=$(date +%s.%N)
    classify_cells cells-x86_64-fields x86_64 host x86_64-fields ""
    classify_cells "cells-arm64-$MAIN_CPU-fields" arm64 "$MAIN_CPU" arm64-fields cells-x86_64-fields
    if [ ${#FIELD_INPUTS[@]} -gt 0 ]; then
        classify_fields fields-x86_64 x86_64 host x86_64-fields ""
        classify_fields "fields-arm64-$MAIN_CPU" arm64 "$MAIN_CPU" arm64-fields fields-x86_64
    fi
    phase_done arm64_fields "$t"
fi

# Where int8 rows differ between the machines: the model input, or a kernel family? (x86_64 vs the first CPU.)
t=$(date +%s.%N)
SAMPLE_CELLS=()
while IFS= read -r f; do SAMPLE_CELLS+=("${f#"$CHECK/inputs/"}"); done < <(find "$CHECK/inputs/edge_runtime/samples" -type f | sort)
(cd "$CHECK/inputs" && "$CHECK/venvs/x86_64-base/bin/python" "$CHECK/tools/pi_check_report.py" int8-kernels \
    "${SAMPLE_CELLS[@]}" --output "$RUNS/x86_64.kernels.json") 2>"$RUNS/kernels-x86_64.stderr" || true
in_root /opt/pi-check/venvs/arm64-base/bin/python /opt/pi-check/tools/pi_check_report.py int8-kernels \
    "${SAMPLE_CELLS[@]}" --output /opt/pi-check/runs/arm64.kernels.json 2>"$RUNS/kernels-arm64.stderr" || true
phase_done int8_kernels "$t"

# 6. tflite-runtime, the interpreter some boards get: is there an aarch64 wheel for the root's Python, and do
# we agree with it? Its venv has no ai-edge-litert, as on a board where that has no wheel.
NEXT_PY=$(python3 -c "import sys; m, n = sys.argv[1].split('.'); print(f'{m}.{int(n) + 1}')" "$PY_TAG")
probe_tflite_wheel() {  # probe_tflite_wheel PLATFORM PYTHON -> yes/no on stdout
    local tmp
    tmp=$(mktemp -d)
    if "$HOST_PY" -m pip download -q tflite-runtime --platform "$1" --python-version "$2" --only-binary=:all: \
            --no-deps -d "$tmp" >/dev/null 2>&1; then echo yes; else echo no; fi
    rm -rf "$tmp"
}
probe_tflite_wheel manylinux2014_aarch64 "$PY_TAG" >"$RUNS/tflite_runtime_manylinux2014.txt"
echo "Python $NEXT_PY: $(probe_tflite_wheel manylinux_2_34_aarch64 "$NEXT_PY")" >"$RUNS/tflite_runtime_next_python.txt"
if [ "$WITH_TFLITE_RUNTIME" = 1 ]; then
    t=$(date +%s.%N)
    if in_root python3 -m pip download -q --only-binary=:all: --no-deps -d /tmp/tflrt tflite-runtime \
            >"$RUNS/tflite_runtime_download.txt" 2>&1; then
        ls "$ROOT/tmp/tflrt" >>"$RUNS/tflite_runtime_download.txt"
        rm -rf "$ROOT/tmp/tflrt"
        BASE_DEPS=$("$CHECK/venvs/x86_64-base/bin/python" "$CHECK/tools/pi_check_report.py" base-deps "$WHEEL" \
                    --without ai-edge-litert | tr '\n' ' ')
        # tflite-runtime 2.14 was built against numpy 1.x; where it cannot load a model with the numpy pip chose, pin
        # numpy<2 and say so. The same install on x86_64 is the reference for its rows.
        tflite_venv() {  # tflite_venv MACHINE
            local name=$1-tflite-runtime py pin_note
            ensure_venv "$name" "$1" "--no-deps @WHEEL@" "$BASE_DEPS tflite-runtime"
            local probe='import glob, os, numpy, tflite_runtime.interpreter as t, malaria_edge.edge_runtime as e; t.Interpreter(model_path=sorted(glob.glob(os.path.join(os.path.dirname(e.__file__), "models", "*.tflite")))[0])'
            local runner=()
            py=$CHECK/venvs/$name/bin/python
            [ "$1" = arm64 ] && runner=(in_root) && py=/opt/pi-check/venvs/$name/bin/python
            pin_note=$CHECK/venvs/$name/.pi-check-numpy-pin
            if ! "${runner[@]}" "$py" -c "$probe" >"$RUNS/tflite_runtime_probe_$1.txt" 2>&1; then
                echo "tflite-runtime cannot load a model with numpy $("${runner[@]}" "$py" -c 'import numpy; print(numpy.__version__)') (\"$(grep -m1 -o 'A module that was compiled using NumPy 1.x[^.]*\|_ARRAY_API not found' "$RUNS/tflite_runtime_probe_$1.txt" || tail -1 "$RUNS/tflite_runtime_probe_$1.txt")\"), so numpy<2 was pinned in this venv." >"$pin_note"
                "${runner[@]}" "$py" -m pip install -q --no-compile 'numpy<2' >>"$RUNS/pip-$name.log" 2>&1
            fi
            [ -f "$pin_note" ] && cp "$pin_note" "$RUNS/tflite_runtime_numpy_pin.txt"
            describe_venv "$name" "$1"
        }
        tflite_venv x86_64
        tflite_venv arm64
        phase_done arm64_venv_tflite_runtime "$t"
        t=$(date +%s.%N)
        classify_cells cells-x86_64-tflite-runtime x86_64 host x86_64-tflite-runtime cells-x86_64-base \
            --backend tflite_runtime
        classify_cells "cells-arm64-$MAIN_CPU-tflite-runtime" arm64 "$MAIN_CPU" arm64-tflite-runtime \
            cells-x86_64-tflite-runtime --backend tflite_runtime
        phase_done arm64_cells_tflite_runtime "$t"
    else
        echo "pi_check: no tflite-runtime wheel for aarch64 Python $PY_TAG on PyPI" >&2
    fi
fi

# 7. The offline bundle, as a field device gets it: edge-bundle on this host (from the x86_64 venv, our wheel given,
# its dependencies' aarch64 wheels from PyPI for the root's Python and glibc), the tar.gz unpacked in the root's /opt
# (the USB stick), then install.sh and edge-classify run in the root inside a network namespace with no interface
# (unshare --net): pip gets --no-index and nothing else to reach. Rows diffed against the normal x86_64 [fields]
# install like every other run, and (in the report) against the normal pip install in this root.
if [ "$WITH_BUNDLE" = 1 ] && [ "$HAS_FIELDS_EXTRA" = 1 ]; then
    t=$(date +%s.%N)
    BUNDLE_NAME=me-bundle
    BUNDLE_BUILD=$CHECK/bundle-build
    BUNDLE_VENV=/opt/pi-check/venvs/arm64-bundle
    rm -rf "$BUNDLE_BUILD" "${ROOT:?}/opt/$BUNDLE_NAME" "$CHECK/venvs/arm64-bundle"
    mkdir -p "$BUNDLE_BUILD"
    start=$(date +%s.%N)
    "$CHECK/venvs/x86_64-fields/bin/edge-bundle" "$BUNDLE_BUILD/$BUNDLE_NAME" --platform aarch64 --python "$PY_TAG" \
        --glibc "2.$GLIBC_MINOR" --wheel "$WHEEL" --cert "${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}" -v \
        >"$RUNS/bundle-build.log" 2>&1 || die "edge-bundle failed: $(tail -3 "$RUNS/bundle-build.log")"
    BUNDLE_BUILD_SECONDS=$(seconds_since "$start")
    tar -C "$ROOT/opt" -xzf "$BUNDLE_BUILD/$BUNDLE_NAME.tar.gz"
    PIP_SOURCE_ENV=()      # nothing of the wheelhouse's pip settings: install.sh's own pip options only
    NET_WRAP=(unshare --net)
    # The proof: the namespace's links as ip sees them (on the host side of the same kind of namespace), and from
    # inside the root the interfaces this process sees and what a connection to PyPI does.
    unshare --net ip -o link show >"$RUNS/bundle-network.txt" 2>&1 || echo "ip link: not available" >"$RUNS/bundle-network.txt"
    in_root python3 -c 'import socket
print("interfaces seen inside the root:", " ".join(n for _, n in socket.if_nameindex()))
for host in ("pypi.org", "151.101.0.223"):
    try:
        socket.create_connection((host, 443), timeout=10).close(); print(f"connect {host}:443: CONNECTED")
    except OSError as err:
        print(f"connect {host}:443: {err}")' >>"$RUNS/bundle-network.txt" 2>&1 || true
    # install.sh's output, each line stamped with the seconds since the start, to split pip from the self-check.
    start=$(date +%s.%N)
    rc=0
    in_root /bin/sh -c "cd /opt/$BUNDLE_NAME && exec ./install.sh $BUNDLE_VENV" 2>&1 \
        | python3 -uc 'import sys, time; t = float(sys.argv[1])
for line in sys.stdin: print(f"{time.time() - t:7.1f} {line}", end="")' "$start" >"$RUNS/bundle-install.log" || rc=$?
    BUNDLE_INSTALL_SECONDS=$(seconds_since "$start")
    echo "pi_check: bundle install.sh in the root, no network: exit $rc in $BUNDLE_INSTALL_SECONDS s" >&2
    python3 - "$BUNDLE_BUILD/$BUNDLE_NAME" "$BUNDLE_BUILD_SECONDS" "$BUNDLE_INSTALL_SECONDS" "$rc" "$MAIN_CPU" \
        "$BUNDLE_VENV" >"$RUNS/bundle.json" <<'PY'
import json, os, sys
folder, build, install, rc, cpu, venv = sys.argv[1:]
size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(folder) for f in fs)
meta = json.load(open(os.path.join(folder, "bundle.json")))
print(json.dumps({"name": os.path.basename(folder), "folder_bytes": size,
                  "archive_bytes": os.path.getsize(folder + ".tar.gz"), "wheels": sorted(meta["wheels"]),
                  "target": meta["target"], "install": meta["install"], "build_seconds": float(build),
                  "install_seconds": float(install), "install_exit_code": int(rc), "cpu": cpu, "venv": venv}))
PY
    if [ "$rc" = 0 ]; then
        VENVS_BUILT=$((VENVS_BUILT + 1))
        describe_venv arm64-bundle arm64
        classify_cells "bundle-cells-arm64-$MAIN_CPU" arm64 "$MAIN_CPU" arm64-bundle cells-x86_64-fields
        [ ${#FIELD_INPUTS[@]} -eq 0 ] \
            || classify_fields "bundle-fields-arm64-$MAIN_CPU" arm64 "$MAIN_CPU" arm64-bundle fields-x86_64
    fi
    NET_WRAP=()
    phase_done bundle "$t"
fi

# 8. The report.
TOTAL=$(seconds_since "$RUN_START")
echo "$(date -u +%Y-%m-%dT%H:%M:%SZ) total_seconds=$TOTAL root_built=$ROOT_BUILT_NOW venvs_built=$VENVS_BUILT venvs=$(ls "$CHECK/venvs" | wc -l) ${PHASES[*]}" >>"$CHECK/timings.log"
mkdir -p "$OUT"
python3 "$REPO/scripts/pi_check_report.py" report --check "$CHECK" --root "$ROOT" --out "$OUT" \
    --repo "$REPO" --wheel "$WHEEL_NAME" --inputs "${INPUTS[*]}" --field-inputs "${FIELD_INPUTS[*]+${FIELD_INPUTS[*]}}" \
    --total-seconds "$TOTAL" --root-built "$ROOT_BUILT_NOW" --venvs-built "$VENVS_BUILT" --phases "${PHASES[*]}"
exit
}
