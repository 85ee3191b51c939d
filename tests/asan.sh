#!/usr/bin/env bash
# AddressSanitizer run of the hostile-guest, guest-memory and model-differential tests
# (split and packed rings), of the fill burst kernel, and of memory-table swaps under
# streaming rings.
#
#   tests/asan.sh [pytest options]          # hostile, memory, model-differential, packed, fill
#   ASAN_TESTS="tests/test_x.py tests/test_y.py" tests/asan.sh -k something
#   ASAN_TESTS=tests tests/asan.sh          # the whole suite
#
# 1. builds an ASAN variant of the package (CMake option VQCORE_ASAN: -O1 -g
#    -fsanitize=address) with `pip wheel` into its own build dir, build/asan;
# 2. installs that wheel into build/asan-venv, a venv that sees the system
#    site-packages (numpy, pytest, hypothesis) and in which the editable install's
#    import redirect is switched off (a sitecustomize.py inside the venv only);
# 3. proves the extension modules are instrumented (__asan_* symbols, libasan linked)
#    and that `import vqcore` resolves to them;
# 4. runs pytest with libasan preloaded and Python's allocator off, so ASAN also
#    guards every numpy buffer; reports go to build/asan-logs/ and fail the run.
# The editable install and its build directory are left alone.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
python=${PYTHON:-python3}
build=build/asan
dist=build/asan-dist
venv=build/asan-venv
logs=$root/build/asan-logs

echo "== building the ASAN wheel (build dir $build)"
rm -rf "$dist"
"$python" -m pip wheel . --no-deps --no-build-isolation -q -w "$dist" \
    -Cbuild-dir="$build" -Ccmake.define.VQCORE_ASAN=ON -Cinstall.strip=false

echo "== installing it into $venv"
if [[ ! -x $venv/bin/python ]]; then
    "$python" -m venv --system-site-packages "$venv"
fi
"$venv/bin/python" -m pip install -q --no-deps --no-index --force-reinstall "$dist"/vqcore-*.whl
site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["platlib"])')
cat > "$site/sitecustomize.py" <<'EOF'
# Written by tests/asan.sh, for this venv only: drop the editable install's import
# redirect (installed by a .pth in the system site-packages) so that `import vqcore`
# finds the AddressSanitizer wheel installed here.
import sys
sys.meta_path[:] = [f for f in sys.meta_path
                    if not (type(f).__name__ == "ScikitBuildRedirectingFinder"
                            and "vqcore" in getattr(f, "known_source_files", {}))]
EOF

echo "== checking the instrumentation"
shopt -s nullglob
sos=("$site"/vqcore/*.so)
(( ${#sos[@]} )) || { echo "no extension modules in $site/vqcore" >&2; exit 1; }
for so in "${sos[@]}"; do
    n=$(nm -D "$so" | grep -c ' U __asan_report_' || true)
    lib=$(ldd "$so" | awk '/libasan/ {print $1}')
    printf '   %-45s %4s __asan_report_* imports, links %s\n' "$(basename "$so")" "$n" "${lib:-NOTHING}"
    [[ $n -gt 0 && -n $lib ]] || { echo "$so is not instrumented" >&2; exit 1; }
done

asan_lib=$(gcc -print-file-name=libasan.so)
rm -rf "$logs"
mkdir -p "$logs"
export LD_PRELOAD=$asan_lib
export ASAN_OPTIONS=detect_leaks=0:log_path=$logs/asan
export PYTHONMALLOC=malloc
"$venv/bin/python" - "$site" <<'EOF'
import sys
import vqcore, vqcore.batch, vqcore.fill, vqcore.memory, vqcore.packed, vqcore.queue, vqcore.split, vqcore.status
for m in (vqcore.batch, vqcore.fill, vqcore.memory, vqcore.packed, vqcore.queue, vqcore.split,
          vqcore.status):
    assert m.__file__.startswith(sys.argv[1]), f"{m.__name__} comes from {m.__file__}"
print("   import vqcore ->", vqcore.__file__)
EOF

# Positive control: one byte written past a numpy buffer must produce a report.
if "$venv/bin/python" -c 'import ctypes, numpy as np
a = np.zeros(64, np.uint8); ctypes.memset(a.ctypes.data, 0, 65)' 2>/dev/null; then
    echo "positive control: the overflow went unnoticed" >&2; exit 1
fi
control=("$logs"/asan.*)
grep -q "heap-buffer-overflow" "${control[@]}" \
    || { echo "positive control: no heap-buffer-overflow report" >&2; exit 1; }
echo "   positive control: a 1-byte overflow of a numpy buffer is reported"
rm -f "${control[@]}"

if [[ -n ${ASAN_TESTS:-} ]]; then
    read -r -a tests <<< "$ASAN_TESTS"
else
    tests=(tests/test_hostile.py tests/test_memory.py)
    [[ -f tests/test_model_differential.py ]] && tests+=(tests/test_model_differential.py)
    # the packed ring: hostile guests, engine vs model, round trips, notifications, layout
    for t in tests/test_packed_hostile.py tests/test_packed_differential.py \
             tests/test_packed_roundtrip.py tests/test_packed_notifications.py \
             tests/test_packed_layout.py; do
        [[ -f $t ]] && tests+=("$t")
    done
    # the fill burst kernel: readv straight into guest memory, hostile rings included
    [[ -f tests/test_fill.py ]] && tests+=(tests/test_fill.py)
    # memory-table swaps under streaming rings: no queue or batch touches an old mapping
    [[ -f tests/test_memory_swaps.py ]] && tests+=(tests/test_memory_swaps.py)
fi
echo "== pytest under AddressSanitizer: ${tests[*]} $*"
set +e
# no faulthandler: a crash must reach ASAN's handler, which writes a symbolized report
"$venv/bin/python" -m pytest -q -p no:cacheprovider -p no:faulthandler "${tests[@]}" "$@"
rc=$?
set -e
reports=("$logs"/asan.*)
if (( ${#reports[@]} )); then
    echo "== AddressSanitizer reports (${#reports[@]}):"
    cat "${reports[@]}"
    exit 1
fi
echo "== no AddressSanitizer report; pytest exit status $rc"
exit $rc
