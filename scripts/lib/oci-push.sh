# Sourced by suites that serve OCI images from a local registry without a
# container tool (scripts/tests.d/70-arm64.sh): pushes through the
# Distribution API v2 with curl, plain HTTP to 127.0.0.1, no auth.
#
# oci_layer DIR OUT        ->  OUT.tar (uncompressed, root-owned, mtime 0) and
#                              OUT.tar.gz of DIR's contents; prints the tar's
#                              digest (the config's diff_id)
# oci_blob REG REPO FILE   ->  uploads FILE as a blob (one monolithic PUT);
#                              prints its digest (sha256:<hex>)
# oci_manifest REG REPO REF TYPE FILE  ->  puts FILE as the manifest REF (a
#                              tag or digest) with media type TYPE
# oci_image REG REPO ARCH VARIANT DIR WORK  ->  pushes DIR as a one-layer image
#                              for linux/ARCH[/VARIANT] (VARIANT may be empty),
#                              untagged; prints "<manifest digest> <size>"
# oci_index REG REPO TAG ENTRY...  ->  tags an image index of ENTRYs, each
#                              "<digest> <size> <arch> [variant]"
# Each fails (non-zero) when the registry refuses.

oci_digest() { echo "sha256:$(sha256sum "$1" | cut -d' ' -f1)"; }

oci_layer() {
  tar --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 -C "$1" -cf "$2.tar" . || return 1
  gzip -n -c "$2.tar" > "$2.tar.gz" || return 1
  oci_digest "$2.tar"
}

oci_blob() {
  local reg=$1 repo=$2 file=$3 digest loc sep
  digest=$(oci_digest "$file")
  loc=$(curl -fsS -o /dev/null -D - -X POST "http://$reg/v2/$repo/blobs/uploads/" |
    tr -d '\r' | awk 'tolower($1) == "location:" { print $2 }') || return 1
  [ -n "$loc" ] || { echo "oci_blob: no upload location from $reg" >&2; return 1; }
  case $loc in /*) loc="http://$reg$loc" ;; esac
  case $loc in *\?*) sep='&' ;; *) sep='?' ;; esac
  curl -fsS -o /dev/null -X PUT -H 'Content-Type: application/octet-stream' \
    --data-binary "@$file" "$loc${sep}digest=$digest" || return 1
  echo "$digest"
}

oci_manifest() {
  curl -fsS -o /dev/null -X PUT -H "Content-Type: $4" --data-binary "@$5" "http://$1/v2/$2/manifests/$3"
}

oci_image() {
  local reg=$1 repo=$2 arch=$3 variant=$4 dir=$5 work=$6 diff_id layer config manifest platform
  mkdir -p "$work" || return 1
  diff_id=$(oci_layer "$dir" "$work/layer") || return 1
  layer=$(oci_blob "$reg" "$repo" "$work/layer.tar.gz") || return 1
  platform="\"architecture\": \"$arch\", \"os\": \"linux\"${variant:+, \"variant\": \"$variant\"}"
  printf '{%s, "config": {}, "rootfs": {"type": "layers", "diff_ids": ["%s"]}}' "$platform" "$diff_id" > "$work/config.json"
  config=$(oci_blob "$reg" "$repo" "$work/config.json") || return 1
  printf '{"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json", %s, %s}' \
    "\"config\": {\"mediaType\": \"application/vnd.oci.image.config.v1+json\", \"digest\": \"$config\", \"size\": $(stat -c %s "$work/config.json")}" \
    "\"layers\": [{\"mediaType\": \"application/vnd.oci.image.layer.v1.tar+gzip\", \"digest\": \"$layer\", \"size\": $(stat -c %s "$work/layer.tar.gz")}]" \
    > "$work/manifest.json"
  manifest=$(oci_digest "$work/manifest.json")
  oci_manifest "$reg" "$repo" "$manifest" application/vnd.oci.image.manifest.v1+json "$work/manifest.json" || return 1
  echo "$manifest $(stat -c %s "$work/manifest.json")"
}

oci_index() {
  local reg=$1 repo=$2 tag=$3 entries="" e digest size arch variant file
  shift 3
  for e in "$@"; do
    read -r digest size arch variant <<<"$e"
    entries+="${entries:+, }{\"mediaType\": \"application/vnd.oci.image.manifest.v1+json\", \"digest\": \"$digest\", \"size\": $size, "
    entries+="\"platform\": {\"architecture\": \"$arch\", \"os\": \"linux\"${variant:+, \"variant\": \"$variant\"}}}"
  done
  file=$(mktemp) || return 1
  printf '{"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": [%s]}' "$entries" > "$file"
  oci_manifest "$reg" "$repo" "$tag" application/vnd.oci.image.index.v1+json "$file"
  local rc=$?
  rm -f "$file"
  return $rc
}
