#!/usr/bin/env bash
# Regenerates api/ from proto/ with pinned generators. Debian 12's protoc
# (libprotoc 3.21), the well-known types from libprotobuf-dev, and
# google/api/{annotations,http}.proto (the HTTP bindings of the
# google.api.http options) from golang-github-gogo-googleapis-dev: Debian's
# copy of the googleapis protos, so nothing is fetched from elsewhere. The
# Go code for them is genproto's (the M options below), not gogo's.
set -euo pipefail
cd "$(dirname "$0")/.."
PROTOC_GEN_GO_VERSION=v1.36.11
PROTOC_GEN_GO_GRPC_VERSION=v1.6.0
# grpc-gateway: the same version go.mod requires for the runtime.
GRPC_GATEWAY_VERSION=v2.29.0
googleapis=/usr/share/gocode/src/github.com/gogo/googleapis
bin="$PWD/.bin"
mkdir -p "$bin"
if ! command -v protoc >/dev/null || [ ! -f /usr/include/google/protobuf/timestamp.proto ] || [ ! -f "$googleapis/google/api/annotations.proto" ]; then
  export DEBIAN_FRONTEND=noninteractive
  pkgs="protobuf-compiler libprotobuf-dev golang-github-gogo-googleapis-dev"
  apt-get install -y -qq --no-install-recommends $pkgs >/dev/null 2>&1 || {
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends $pkgs >/dev/null
  }
fi
[ -x "$bin/protoc-gen-go-$PROTOC_GEN_GO_VERSION" ] || {
  GOBIN="$bin" go install "google.golang.org/protobuf/cmd/protoc-gen-go@$PROTOC_GEN_GO_VERSION"
  mv "$bin/protoc-gen-go" "$bin/protoc-gen-go-$PROTOC_GEN_GO_VERSION"
}
[ -x "$bin/protoc-gen-go-grpc-$PROTOC_GEN_GO_GRPC_VERSION" ] || {
  GOBIN="$bin" go install "google.golang.org/grpc/cmd/protoc-gen-go-grpc@$PROTOC_GEN_GO_GRPC_VERSION"
  mv "$bin/protoc-gen-go-grpc" "$bin/protoc-gen-go-grpc-$PROTOC_GEN_GO_GRPC_VERSION"
}
for gen in protoc-gen-grpc-gateway protoc-gen-openapiv2; do
  [ -x "$bin/$gen-$GRPC_GATEWAY_VERSION" ] || {
    GOBIN="$bin" go install "github.com/grpc-ecosystem/grpc-gateway/v2/$gen@$GRPC_GATEWAY_VERSION"
    mv "$bin/$gen" "$bin/$gen-$GRPC_GATEWAY_VERSION"
  }
done
annotations=google.golang.org/genproto/googleapis/api/annotations
gapi="Mgoogle/api/annotations.proto=$annotations,Mgoogle/api/http.proto=$annotations"
rm -rf api/minicloud api/httpapi/openapi.json
mkdir -p api api/httpapi
protoc -I proto -I /usr/include -I "$googleapis" \
  --plugin=protoc-gen-go="$bin/protoc-gen-go-$PROTOC_GEN_GO_VERSION" \
  --plugin=protoc-gen-go-grpc="$bin/protoc-gen-go-grpc-$PROTOC_GEN_GO_GRPC_VERSION" \
  --plugin=protoc-gen-grpc-gateway="$bin/protoc-gen-grpc-gateway-$GRPC_GATEWAY_VERSION" \
  --plugin=protoc-gen-openapiv2="$bin/protoc-gen-openapiv2-$GRPC_GATEWAY_VERSION" \
  --go_out=api --go_opt=module=github.com/minicloud/minicloud/api,$gapi \
  --go-grpc_out=api --go-grpc_opt=module=github.com/minicloud/minicloud/api,$gapi \
  --grpc-gateway_out=api --grpc-gateway_opt=module=github.com/minicloud/minicloud/api,$gapi \
  --openapiv2_out=api/httpapi \
  --openapiv2_opt=allow_merge=true,merge_file_name=openapi,openapi_configuration=proto/openapi/openapi.yaml,$gapi \
  proto/minicloud/v1/*.proto
# The HTTP listener serves it as /openapi.json (api/httpapi embeds it).
mv api/httpapi/openapi.swagger.json api/httpapi/openapi.json
