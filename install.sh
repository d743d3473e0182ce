#!/bin/sh
# vramsupply installer: curl -fsSL https://vram.supply/install.sh | sh
#
# Installs the vramsupply agent into its own virtual environment and links the
# `vramsupply` command onto PATH. Re-running upgrades in place.
#
#   sh install.sh [--version X | --from PATH] [--backend cpu|cuda|metal] [--dev]
#                 [--service] [--uninstall [--purge]]
#
# Environment overrides: VRAMSUPPLY_VERSION, VRAMSUPPLY_FROM, VRAMSUPPLY_BACKEND,
# VRAMSUPPLY_DATA_DIR (where the venv lives), VRAMSUPPLY_BIN_DIR (where the link goes).
#
# Everything runs from main(), called on the last line, so a truncated download runs nothing.
set -eu

say() { printf '%s\n' "vramsupply: $*"; }
die() { printf '%s\n' "vramsupply: error: $*" >&2; exit 1; }
have() { command -v "$1" >/dev/null 2>&1; }
# systemd is the init system (sd_booted(3)), not merely installed.
systemd_present() { have systemctl && [ -d /run/systemd/system ]; }

usage() {
    sed -n '2,13p' "$0" 2>/dev/null | sed 's/^# \{0,1\}//' || true
}

default_data_dir() {
    if [ "$(id -u)" = 0 ]; then
        echo "/usr/local/share/vramsupply"
    elif [ "$(uname -s)" = Darwin ]; then
        echo "$HOME/Library/Application Support/vramsupply"
    else
        echo "${XDG_DATA_HOME:-$HOME/.local/share}/vramsupply"
    fi
}

default_bin_dir() {
    if [ "$(id -u)" = 0 ]; then echo "/usr/local/bin"; else echo "$HOME/.local/bin"; fi
}

agent_data_dir() {
    # Where the agent keeps its endpoint token and registration state (platformdirs user data dir).
    if [ "$(uname -s)" = Darwin ]; then
        echo "$HOME/Library/Application Support/vramsupply"
    else
        echo "${XDG_DATA_HOME:-$HOME/.local/share}/vramsupply"
    fi
}

config_dir() {
    if [ "$(uname -s)" = Darwin ]; then
        echo "$HOME/Library/Application Support/vramsupply"
    else
        echo "${XDG_CONFIG_HOME:-$HOME/.config}/vramsupply"
    fi
}

service_unit() {
    # Where `vramsupply service install` puts the unit: system-wide as root, else the user's.
    if [ "$(id -u)" = 0 ]; then
        echo "/etc/systemd/system/vramsupply.service"
    else
        echo "${XDG_CONFIG_HOME:-$HOME/.config}/systemd/user/vramsupply.service"
    fi
}

find_python() {
    for candidate in python3.13 python3.12 python3.11 python3.10 python3; do
        if have "$candidate" && "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
            echo "$candidate"
            return 0
        fi
    done
    return 1
}

detect_backend() {
    if [ -n "${VRAMSUPPLY_BACKEND:-}" ]; then
        echo "$VRAMSUPPLY_BACKEND"
    elif have nvidia-smi || have nvcc; then
        echo cuda
    elif [ "$(uname -s)" = Darwin ] && [ "$(uname -m)" = arm64 ]; then
        echo metal
    else
        echo cpu
    fi
}

cmake_args_for() {
    case "$1" in
        cuda) echo "-DGGML_CUDA=on" ;;
        metal) echo "-DGGML_METAL=on" ;;
        cpu) echo "" ;;
        *) die "unknown backend '$1' (expected cpu, cuda or metal)" ;;
    esac
}

checkout_dir() {
    # The directory this script lives in, when it is a vramsupply checkout (sh install.sh).
    case "$0" in
        */install.sh | install.sh) dir=$(cd "$(dirname "$0")" && pwd) ;;
        *) return 1 ;;
    esac
    grep -q '^name = "vramsupply"' "$dir/pyproject.toml" 2>/dev/null && echo "$dir"
}

require_build_tools() {
    cc_found=""
    for compiler in cc gcc clang; do have "$compiler" && cc_found=$compiler && break; done
    [ -n "$cc_found" ] || die "no C compiler found; llama.cpp is built from source. Install one (Debian/Ubuntu: apt install build-essential; macOS: xcode-select --install)"
    have c++ || have g++ || have clang++ || die "no C++ compiler found (Debian/Ubuntu: apt install build-essential)"
    have cmake || die "cmake not found; llama.cpp needs it to build (Debian/Ubuntu: apt install cmake; macOS: brew install cmake)"
}

uninstall() {
    data_dir=$1 bin_dir=$2 purge=$3
    venv="$data_dir/venv"
    # Only the service that runs this install's agent, not one belonging to another venv.
    if grep -qF "ExecStart=$venv/bin/vramsupply " "$(service_unit)" 2>/dev/null && [ -x "$venv/bin/vramsupply" ]; then
        scope="" purge_flag=""
        if [ "$(id -u)" != 0 ]; then scope="--user"; fi
        if [ "$purge" = 1 ]; then purge_flag="--purge"; fi
        # shellcheck disable=SC2086
        "$venv/bin/vramsupply" service uninstall $scope $purge_flag || say "could not remove the systemd service; run: vramsupply service uninstall $scope"
    fi
    if [ "$purge" = 1 ] && [ -x "$venv/bin/vramsupply" ]; then
        "$venv/bin/vramsupply" models rm --all --yes || say "could not remove downloaded models; remove them with 'hf cache' if you wish"
    fi
    link="$bin_dir/vramsupply"
    if [ -L "$link" ]; then rm -f "$link" && say "removed $link"; fi
    if [ -d "$venv" ]; then rm -rf "$venv" && say "removed $venv"; fi
    rm -f "$data_dir/backend" "$(agent_data_dir)/registration.json"
    rmdir "$data_dir" "$(agent_data_dir)" 2>/dev/null || true
    if [ "$purge" = 1 ]; then
        rm -rf "$data_dir" "$(agent_data_dir)" "$(config_dir)"
        say "removed configuration and data ($(config_dir), $(agent_data_dir), $data_dir)"
    else
        say "kept configuration ($(config_dir), endpoint token) and downloaded models; use --uninstall --purge to remove them too"
    fi
}

main() {
    version=${VRAMSUPPLY_VERSION:-}
    from=${VRAMSUPPLY_FROM:-}
    backend=""
    dev=0 service=0 remove=0 purge=0
    while [ $# -gt 0 ]; do
        case "$1" in
            --version) [ $# -ge 2 ] || die "--version needs a value"; version=$2; shift ;;
            --from) [ $# -ge 2 ] || die "--from needs a path"; from=$2; shift ;;
            --backend) [ $# -ge 2 ] || die "--backend needs cpu, cuda or metal"; backend=$2; shift ;;
            --dev) dev=1 ;;
            --service) service=1 ;;
            --uninstall) remove=1 ;;
            --purge) purge=1 ;;
            -h | --help) usage; exit 0 ;;
            *) die "unknown option '$1' (see --help)" ;;
        esac
        shift
    done

    data_dir=${VRAMSUPPLY_DATA_DIR:-$(default_data_dir)}
    bin_dir=${VRAMSUPPLY_BIN_DIR:-$(default_bin_dir)}
    venv="$data_dir/venv"

    if [ "$remove" = 1 ]; then
        uninstall "$data_dir" "$bin_dir" "$purge"
        return 0
    fi

    python=$(find_python) || die "Python 3.10 or newer is required (Debian/Ubuntu: apt install python3 python3-venv; macOS: brew install python)"
    "$python" -m venv --help >/dev/null 2>&1 || die "$python cannot create virtual environments (Debian/Ubuntu: apt install python3-venv)"

    [ -n "$backend" ] || backend=$(detect_backend)
    cmake_args=$(cmake_args_for "$backend")
    say "llama.cpp backend: $backend"

    if [ -z "$from" ] && [ -z "$version" ]; then
        from=$(checkout_dir || true)
    fi
    if [ -n "$from" ]; then
        [ -e "$from" ] || die "--from path '$from' does not exist"
        spec=$(cd "$from" 2>/dev/null && pwd || echo "$from")
        say "installing from $spec"
    elif [ -n "$version" ]; then
        spec="vramsupply==$version"
        say "installing $spec from PyPI"
    else
        spec="vramsupply"
        say "installing the latest vramsupply from PyPI"
    fi
    if [ "$dev" = 1 ]; then spec="${spec}[dev]"; fi

    mkdir -p "$data_dir" "$bin_dir"
    if [ ! -x "$venv/bin/python" ]; then
        say "creating virtual environment in $venv"
        "$python" -m venv "$venv"
    fi
    pip="$venv/bin/python -m pip --disable-pip-version-check"
    $pip install --quiet --upgrade pip

    previous_backend=$(cat "$data_dir/backend" 2>/dev/null || echo none)
    if [ "$previous_backend" != "$backend" ] || ! "$venv/bin/python" -c 'import llama_cpp' >/dev/null 2>&1; then
        require_build_tools
        say "building llama-cpp-python for $backend (several minutes on a small machine)"
        reinstall=""
        if [ "$previous_backend" != none ] && [ "$previous_backend" != "$backend" ]; then reinstall="--force-reinstall --no-cache-dir"; fi
        # shellcheck disable=SC2086
        CMAKE_ARGS="$cmake_args" $pip install --quiet $reinstall "llama-cpp-python>=0.3.36,<0.4"
        echo "$backend" > "$data_dir/backend"
    fi

    $pip install --quiet --upgrade "$spec"
    ln -sf "$venv/bin/vramsupply" "$bin_dir/vramsupply"
    say "installed $("$venv/bin/vramsupply" --version) -> $bin_dir/vramsupply"

    case ":$PATH:" in
        *":$bin_dir:"*) ;;
        *) say "$bin_dir is not on your PATH; add it with: export PATH=\"$bin_dir:\$PATH\" (in ~/.profile to keep it)" ;;
    esac

    if [ "$service" = 0 ] && [ -t 0 ] && systemd_present; then
        printf '%s' "vramsupply: install the systemd service now? [y/N] "
        read -r answer || answer=""
        case "$answer" in [Yy]*) service=1 ;; esac
    fi
    if [ "$service" = 1 ]; then
        # As root the system unit (dedicated user); otherwise the per-user unit.
        if [ "$(id -u)" = 0 ]; then
            "$venv/bin/vramsupply" service install
        else
            "$venv/bin/vramsupply" service install --user
        fi
    fi
    say "next: vramsupply serve --demo   (or: vramsupply login, then vramsupply serve --model org/model)"
}

main "$@"
