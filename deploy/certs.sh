#!/usr/bin/env bash
# Make a private CA and a SuperLink server certificate signed by it.
#
# Usage: deploy/certs.sh OUT_DIR [EXTRA_NAME ...]
#
#   OUT_DIR     folder for ca.crt, ca.key, server.pem, server.key (created)
#   EXTRA_NAME  public DNS names or IP addresses of the SuperLink host (e.g.
#               fl.example.org, 203.0.113.7, or "superlink" in Docker Compose),
#               added to the certificate's subjectAltName next to 127.0.0.1 and
#               localhost: SuperNodes and the flwr CLI check the name they dial.
#   CERT_DAYS   environment: validity in days (default 365)
#
# An existing ca.crt/ca.key in OUT_DIR is reused, so a new server certificate
# (new name, renewal) stays valid for nodes that already trust the CA.
#
# Gives the SuperLink:  --ssl-ca-certfile ca.crt --ssl-certfile server.pem
#                       --ssl-keyfile server.key
# Gives each SuperNode and the flwr CLI:  ca.crt (root certificate) only.
# ca.key signs server certificates: keep it off the server and off the nodes.
set -euo pipefail

if [[ $# -lt 1 ]]; then
    echo "usage: $0 OUT_DIR [EXTRA_DNS_NAME_OR_IP ...]" >&2
    exit 2
fi
out="$1"
shift
days="${CERT_DAYS:-365}"
command -v openssl >/dev/null || { echo "openssl not found; install it (apt-get install openssl)" >&2; exit 1; }

mkdir -p "$out"
cd "$out"

# 127.0.0.1 is always needed: the SuperLink's own ServerApp runtime (SuperExec)
# connects to it over TLS on the loopback address.
san="IP:127.0.0.1,DNS:localhost"
for name in "$@"; do
    if [[ "$name" =~ ^[0-9]+(\.[0-9]+){3}$ || "$name" == *:* ]]; then
        san="$san,IP:$name"
    else
        san="$san,DNS:$name"
    fi
done

# 1. The certificate authority (self-signed), unless there is one already.
if [[ ! -f ca.crt || ! -f ca.key ]]; then
    openssl req -x509 -newkey rsa:2048 -nodes -sha256 -days "$days" \
        -keyout ca.key -out ca.crt -subj "/CN=Flower deployment CA" \
        -addext "basicConstraints=critical,CA:TRUE" \
        -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
fi

# 2. The SuperLink's key and signing request.
openssl req -newkey rsa:2048 -nodes -sha256 \
    -keyout server.key -out server.csr -subj "/CN=flower-superlink" 2>/dev/null

# 3. Sign it with the CA, with the names clients dial as subjectAltName.
cat > server.ext <<EXT
basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=$san
EXT
openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial \
    -out server.pem -days "$days" -sha256 -extfile server.ext 2>/dev/null
rm -f server.csr server.ext ca.srl
chmod 600 ca.key server.key

echo "certificates in $(pwd): ca.crt server.pem server.key (SAN: $san)"
