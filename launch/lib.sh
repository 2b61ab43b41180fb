# Shared helpers of the launch scripts (sourced; not run). The sourcing script sets $prog first
# and dry_run=0|1 before calling run.
# shellcheck shell=bash
: "${prog:=launch}" "${dry_run:=0}"

die() { echo "$prog: error: $*" >&2; exit 2; }

# A word quoted for a POSIX shell: bare when it is safe, else in single quotes (after the
# '--flag=' or 'KEY=' of an option or assignment, which reads better and means the same).
quote() {
  local w=$1 sq="'\\''"
  if [[ $w =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
    printf '%s' "$w"
  elif [[ $w =~ ^(--?[A-Za-z0-9_.-]+=|[A-Za-z_][A-Za-z0-9_]*=)(.*)$ ]]; then
    printf "%s'%s'" "${BASH_REMATCH[1]}" "${BASH_REMATCH[2]//\'/$sq}"
  else
    printf "'%s'" "${w//\'/$sq}"
  fi
}

quote_all() {  # the arguments, quoted, space separated
  local w out=""
  for w in "$@"; do out+="${out:+ }$(quote "$w")"; done
  printf '%s' "$out"
}

# Words inside a remote command (which itself travels single-quoted): double quotes where that is
# exact (no " $ ` \ !), so the printed command stays readable.
rquote_all() {
  local w out=""
  for w in "$@"; do
    if [[ $w =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
      out+="${out:+ }$w"
    elif [[ $w != *[\"\$\`\\\!]* ]]; then
      out+="${out:+ }\"$w\""
    else
      out+="${out:+ }$(quote "$w")"
    fi
  done
  printf '%s' "$out"
}

rquote() { rquote_all "$1"; }

# Every external command goes through run: printed instead of run under --dry-run.
run() {
  if ((dry_run)); then quote_all "$@"; echo; return 0; fi
  echo "+ $(quote_all "$@")" >&2
  "$@"
}

is_uint() { [[ $1 =~ ^(0|[1-9][0-9]*)$ ]]; }
is_pos() { [[ $1 =~ ^[1-9][0-9]*$ ]]; }
