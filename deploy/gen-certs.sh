#!/usr/bin/env bash
# Consilia certificates and keys: a private CA, the coordinator's TLS certificate, site keys.
#
#   deploy/gen-certs.sh [-o OUT_DIR] [--dns NAME]... [--ip ADDR]... [--site NAME]... [--days N]
#
# Writes (existing files are kept, so re-running only adds what is missing):
#   OUT_DIR/ca.crt, ca.key                 private CA (keep ca.key offline; give ca.crt to sites)
#   OUT_DIR/coordinator.crt, .key          SuperLink TLS certificate; SAN = localhost,
#                                          IP:127.0.0.1 (the SuperLink's own ServerApp
#                                          executor connects there) + every --dns / --ip
#   OUT_DIR/sites/NAME/supernode.key(.pub) OpenSSH ECDSA P-384 key pair of site NAME
#                                          (fl-server register-site takes the .pub file)
#   OUT_DIR/sites/NAME/ca.crt              copy of the CA certificate for that site
#
# In production each hospital creates its own key pair (`--site NAME -o DIR` on its own
# machine, or `ssh-keygen -t ecdsa -b 384 -N "" -f supernode.key`) and sends only the .pub
# file to the coordinator operator; the private key never leaves the hospital.
set -euo pipefail

OUT="certs"
DAYS=825
DNS_NAMES=()
IPS=()
SITES=()

usage() { sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    -o|--out) OUT="$2"; shift 2 ;;
    --dns) DNS_NAMES+=("$2"); shift 2 ;;
    --ip) IPS+=("$2"); shift 2 ;;
    --site) SITES+=("$2"); shift 2 ;;
    --days) DAYS="$2"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gen-certs.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done

for tool in openssl ssh-keygen; do
  command -v "$tool" >/dev/null 2>&1 || { echo "gen-certs.sh: '$tool' not found; install it" >&2; exit 1; }
done

mkdir -p "$OUT"
umask 077

# --- CA ----------------------------------------------------------------------------------
if [[ ! -f "$OUT/ca.crt" ]]; then
  openssl ecparam -name secp384r1 -genkey -noout -out "$OUT/ca.key"
  openssl req -x509 -new -key "$OUT/ca.key" -sha384 -days "$DAYS" \
    -subj "/O=Consilia/CN=Consilia federation CA" \
    -addext "basicConstraints=critical,CA:TRUE,pathlen:0" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -addext "subjectKeyIdentifier=hash" \
    -out "$OUT/ca.crt"
  echo "created CA: $OUT/ca.crt"
fi

# --- coordinator certificate ---------------------------------------------------------------
if [[ ! -f "$OUT/coordinator.crt" ]]; then
  SAN="DNS:localhost,IP:127.0.0.1"
  for name in "${DNS_NAMES[@]+"${DNS_NAMES[@]}"}"; do SAN="$SAN,DNS:$name"; done
  for ip in "${IPS[@]+"${IPS[@]}"}"; do SAN="$SAN,IP:$ip"; done
  CN="${DNS_NAMES[0]:-localhost}"
  openssl ecparam -name prime256v1 -genkey -noout -out "$OUT/coordinator.key"
  EXT="$(mktemp)"
  trap 'rm -f "$EXT" "$OUT/coordinator.csr"' EXIT
  cat >"$EXT" <<EOF
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectKeyIdentifier=hash
authorityKeyIdentifier=keyid,issuer
subjectAltName=$SAN
EOF
  openssl req -new -key "$OUT/coordinator.key" -subj "/O=Consilia/CN=$CN" \
    -out "$OUT/coordinator.csr"
  openssl x509 -req -in "$OUT/coordinator.csr" -CA "$OUT/ca.crt" -CAkey "$OUT/ca.key" \
    -CAcreateserial -days "$DAYS" -sha256 -extfile "$EXT" -out "$OUT/coordinator.crt" 2>/dev/null
  echo "created coordinator certificate: $OUT/coordinator.crt (SAN $SAN)"
fi
chmod 644 "$OUT/ca.crt" "$OUT/coordinator.crt"

# --- site keys -------------------------------------------------------------------------------
for site in "${SITES[@]+"${SITES[@]}"}"; do
  if [[ ! "$site" =~ ^[A-Za-z0-9][A-Za-z0-9_.-]*$ ]]; then
    echo "gen-certs.sh: site name '$site' must be letters, digits, '.', '_' or '-'" >&2
    exit 2
  fi
  dir="$OUT/sites/$site"
  mkdir -p "$dir"
  if [[ ! -f "$dir/supernode.key" ]]; then
    ssh-keygen -q -t ecdsa -b 384 -N "" -C "consilia-site-$site" -f "$dir/supernode.key"
    echo "created site key: $dir/supernode.key(.pub)"
  fi
  cp "$OUT/ca.crt" "$dir/ca.crt"
  chmod 644 "$dir/supernode.key.pub" "$dir/ca.crt"
done
