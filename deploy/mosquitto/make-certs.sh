#!/usr/bin/env bash
# Makes a local CA plus a server and a client certificate for Mosquitto's TLS listener (openssl only).
# Usage: make-certs.sh OUT_DIR [HOST...]   (hosts go into the server certificate's subjectAltName;
# default 127.0.0.1 and localhost). Existing files are kept, so running it twice changes nothing.
set -euo pipefail
out=${1:?usage: make-certs.sh OUT_DIR [HOST...]}
shift || true
hosts=("$@")
[ ${#hosts[@]} -eq 0 ] && hosts=(127.0.0.1 localhost)
mkdir -p "$out"
cd "$out"
umask 077
san=""
for h in "${hosts[@]}"; do
  if [[ $h =~ ^[0-9.]+$ || $h == *:* ]]; then san+="IP:$h,"; else san+="DNS:$h,"; fi
done
san=${san%,}

if [ ! -f ca.crt ]; then
  openssl req -x509 -newkey rsa:2048 -nodes -sha256 -days 3650 -keyout ca.key -out ca.crt \
    -subj "/CN=Fleetwatch local CA" -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
fi

issue() {  # issue NAME SUBJECT EXTENSIONS
  local name=$1 subject=$2 ext=$3
  [ -f "$name.crt" ] && return 0
  openssl req -newkey rsa:2048 -nodes -sha256 -keyout "$name.key" -out "$name.csr" -subj "$subject" 2>/dev/null
  printf '%b' "$ext" > "$name.ext"
  openssl x509 -req -in "$name.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -days 825 -sha256 \
    -extfile "$name.ext" -out "$name.crt" 2>/dev/null
  rm -f "$name.csr" "$name.ext"
}
issue server "/CN=${hosts[0]}" "subjectAltName=$san\nextendedKeyUsage=serverAuth\nkeyUsage=digitalSignature,keyEncipherment\n"
issue client "/CN=fleetwatch-client" "extendedKeyUsage=clientAuth\nkeyUsage=digitalSignature,keyEncipherment\n"
chmod 644 ca.crt server.crt client.crt
echo "certificates in $out: ca.crt server.crt/key client.crt/key"
