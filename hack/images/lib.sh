# Shared helpers for the image build scripts (sourced, not executed).

log() { echo "$(basename "$0"): $*" >&2; }
die() {
	echo "$(basename "$0"): $*" >&2
	exit 1
}

# debian_mirror prints the Debian archive URI this machine's apt already uses
# for SUITE (default bookworm), so the repository never names a registry host.
# MIRROR in the environment overrides it.
debian_mirror() {
	local suite=${1:-bookworm}
	if [[ -n ${MIRROR:-} ]]; then
		echo "$MIRROR"
		return
	fi
	local f uri
	# deb822 (.sources): stanzas of "URIs:" and "Suites:" fields.
	for f in /etc/apt/sources.list.d/*.sources; do
		[[ -e $f ]] || continue
		uri=$(awk -v suite="$suite" '
			BEGIN { RS = ""; FS = "\n" }
			{
				u = ""; s = ""
				for (i = 1; i <= NF; i++) {
					if ($i ~ /^URIs:/) { u = $i; sub(/^URIs:[ \t]*/, "", u); split(u, a, /[ \t]+/); u = a[1] }
					if ($i ~ /^Suites:/) { s = " " $i " "; sub(/^ Suites:/, "", s) }
				}
				if (u != "" && index(s, " " suite " ") > 0) { print u; exit }
			}' "$f")
		if [[ -n $uri ]]; then
			echo "$uri"
			return
		fi
	done
	# one-line format: "deb [opts] URI SUITE COMPONENTS".
	for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
		[[ -e $f ]] || continue
		uri=$(awk -v suite="$suite" '
			$1 == "deb" {
				i = 2
				if ($i ~ /^\[/) { while ($i !~ /\]$/) i++; i++ }
				if ($(i + 1) == suite) { print $i; exit }
			}' "$f")
		if [[ -n $uri ]]; then
			echo "$uri"
			return
		fi
	done
	die "no apt source for suite $suite found in /etc/apt; set MIRROR"
}

# latest_kernel prints the version of the newest /boot/vmlinuz-* under ROOT.
latest_kernel() {
	local root=${1:-}
	local k
	k=$(find "$root/boot" -maxdepth 1 -name 'vmlinuz-*' -printf '%f\n' 2>/dev/null | sed 's/^vmlinuz-//' | sort -V | tail -n1)
	[[ -n $k ]] || die "no kernel in $root/boot"
	echo "$k"
}
