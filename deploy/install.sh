#!/usr/bin/env bash
# Installs, upgrades or removes an Outpost node agent or control plane member on this machine
# (or in a root file system, with --root): the binary in /usr/local/bin, its systemd unit,
# its configuration file in /etc/outpost, and for a node the join token it uses once.
#
#   install.sh node --server HOST:PORT --token TOKEN [--name NAME] [--binary FILE]
#   install.sh node --binary FILE            upgrade: new binary, same config and identity
#   install.sh control [--api-listen ADDR] [--binary DIR]
#   install.sh uninstall node|control [--purge]
#
# Options for all: --root DIR (install into DIR, as for a board's image or a chroot; nothing
# is started), --data-dir DIR (the data dir the config file names), --no-start.
# The binary defaults to deploy/out/<this machine's target>/ beside this script, then to the
# one on PATH. On a machine run by systemd the service is enabled and (re)started; elsewhere
# the script says how to start it. An upgrade keeps the node's identity and cache: the new
# agent starts the pods it had from its cache, without waiting for the control plane.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
die() { echo "install.sh: $*" >&2; exit 1; }

[ $# -ge 1 ] || die "usage: install.sh node|control|uninstall ... (see the head of this script)"
action="$1"; shift
what="$action"
if [ "$action" = uninstall ]; then
  [ $# -ge 1 ] || die "usage: install.sh uninstall node|control [--purge] [--root DIR]"
  what="$1"; shift
fi
case "$what" in node|control) ;; *) die "install.sh: '$what' is neither node nor control" ;; esac

root="" server="" token="" name="" binary="" data_dir="" api_listen="0.0.0.0:6443"
start=1 purge=0
while [ $# -gt 0 ]; do
  case "$1" in
    --root) root="${2%/}"; start=0; shift 2 ;;
    --server) server="$2"; shift 2 ;;
    --token) token="$2"; shift 2 ;;
    --name) name="$2"; shift 2 ;;
    --binary) binary="$2"; shift 2 ;;
    --data-dir) data_dir="$2"; shift 2 ;;
    --api-listen) api_listen="$2"; shift 2 ;;
    --no-start) start=0; shift ;;
    --purge) purge=1; shift ;;
    *) die "unknown option $1" ;;
  esac
done
[ -n "$root" ] || [ "$(id -u)" = 0 ] || die "run as root (or give --root DIR)"

unit="outpost-$what.service"
etc="$root/etc/outpost"
conf="$etc/$what.toml"
units="$root/etc/systemd/system"
bin="$root/usr/local/bin"
systemd=0
[ -z "$root" ] && [ -d /run/systemd/system ] && systemd=1
default_data="/var/lib/outpost-$what"

if [ "$action" = uninstall ]; then
  if [ $systemd = 1 ]; then systemctl disable --now "$unit" 2>/dev/null || true; fi
  rm -f "$units/multi-user.target.wants/$unit" "$units/$unit"
  if [ "$what" = node ]; then rm -f "$bin/outpost-node"; else rm -f "$bin/outpost-control" "$bin/outpost"; fi
  if [ $purge = 1 ]; then
    dd="$(sed -n 's/^data-dir *= *"\(.*\)"/\1/p' "$conf" 2>/dev/null | head -1)"
    rm -rf "$root${dd:-$default_data}" "$conf"
    [ "$what" = control ] && rm -rf "$root/var/lib/private/outpost-control"
    rmdir "$etc" 2>/dev/null || true
  fi
  [ $systemd = 1 ] && systemctl daemon-reload
  if [ $purge = 1 ]; then echo "outpost-$what removed, with its config and data"
  else echo "outpost-$what removed; its config and data stay (--purge removes them)"; fi
  exit 0
fi

if [ "$what" = node ] && [ ! -e "$conf" ] && { [ -z "$server" ] || [ -z "$token" ]; }; then
  die "a first install of a node needs --server HOST:PORT and --token TOKEN"
fi

# The binaries.
case "$(uname -m)" in aarch64|arm64) arch=aarch64 ;; *) arch="$(uname -m)" ;; esac
out="$here/out/$arch-unknown-linux-musl"
find_bin() { # name
  if [ -n "$binary" ]; then
    if [ -d "$binary" ]; then echo "$binary/$1"; else echo "$binary"; fi
  elif [ -x "$out/$1" ]; then echo "$out/$1"
  elif command -v "$1" >/dev/null; then command -v "$1"
  else die "no $1 binary: build one with deploy/build.sh or give --binary"; fi
}
put_bin() { # source name: replace atomically, so a running agent keeps its old file
  [ -x "$1" ] || die "$1 is not an executable"
  install -d "$bin"
  install -m 0755 "$1" "$bin/.$2.new"
  mv -f "$bin/.$2.new" "$bin/$2"
}
if [ "$what" = node ]; then
  put_bin "$(find_bin outpost-node)" outpost-node
else
  src="$(find_bin outpost-control)"
  put_bin "$src" outpost-control
  admin="$(dirname "$src")/outpost"
  [ -x "$admin" ] && put_bin "$admin" outpost
fi

# The configuration file: written on first install (or when a new server or token is
# given), kept on upgrade.
install -d -m 0755 "$etc"
write=0
[ -e "$conf" ] || write=1
[ "$what" = node ] && [ -n "$server$token" ] && write=1
if [ $write = 1 ]; then
  if [ "$what" = node ] && { [ -z "$server" ] || [ -z "$token" ]; }; then
    die "a first install of a node needs --server HOST:PORT and --token TOKEN"
  fi
  tmp="$(mktemp "$etc/.$what.XXXXXX")"
  sed -e "s|@SERVER@|$server|; s|@TOKEN@|$token|; s|@API@|$api_listen|" "$here/$what.toml" > "$tmp"
  [ -n "$name" ] && sed -i "s|^# name = .*|name = \"$name\"|" "$tmp"
  if [ -n "$data_dir" ]; then
    sed -i "s|^# data-dir = .*|data-dir = \"$data_dir\"|; s|^data-dir = .*|data-dir = \"$data_dir\"|" "$tmp"
  fi
  chmod 0600 "$tmp"
  mv -f "$tmp" "$conf"
fi

# The unit, enabled for the next boot.
install -d "$units/multi-user.target.wants"
install -m 0644 "$here/$unit" "$units/$unit"
ln -sf "/etc/systemd/system/$unit" "$units/multi-user.target.wants/$unit"

if [ $systemd = 1 ] && [ $start = 1 ]; then
  systemctl daemon-reload
  systemctl restart "$unit"
  echo "outpost-$what installed and (re)started: journalctl -u $unit"
elif [ -n "$root" ]; then
  echo "outpost-$what installed in $root; it starts at the system's next boot"
else
  echo "outpost-$what installed; start it with: /usr/local/bin/outpost-$what --config /etc/outpost/$what.toml"
fi
