#!/usr/bin/env bash
# Every figure of the bundled model's card, measured end to end through the engine (`longmoe eval`), into
# recipes/bundled/results/. Rerunning resumes (each evaluation's results directory is keyed to the model's content).
#   recipes/bundled/evaluate.sh [MODEL_DIR] [what ...]     what: niah long ten general ruler nll huge (default: all but huge)
# Times on 2 CPU cores (AMD EPYC, fp32): niah ~25 min, long (1M) ~10 min, ten ~3 min, general ~10 min, ruler ~10 min,
# nll ~5 min, huge (10M, the stretch) ~10 min per depth.
set -euo pipefail
cd "$(dirname "$0")/../.."
model=${1:-src/longmoe/data/bundled}
shift || true
what=${*:-niah long ten general ruler nll}
out=recipes/bundled/results
lm=".venv/bin/longmoe"
lengths=1024,2048,4096,8192,16384,32768,65536,131072
depths=0,25,50,75,100
mkdir -p "$out"
for w in $what; do
  case $w in
    niah)  # the headline: prose and code haystacks the model never saw, cities it never saw, 10 trials per cell
      for h in perl-docs perl-code; do
        $lm eval niah --model "$model" --haystack $h --lengths $lengths --depths $depths --samples 10 \
          --out "$out/niah-$h" --json > "$out/niah-$h.json"
      done ;;
    long)  # a million tokens, five depths, each trial a full prefill
      for h in perl-docs perl-code; do
        $lm eval niah --model "$model" --haystack $h --lengths 1048576 --depths $depths --samples 1 \
          --out "$out/niah-1m-$h" --json > "$out/niah-1m-$h.json"
      done ;;
    ten)  # ten needles in 128K, each asked on its own
      $lm eval niah --model "$model" --haystack perl-docs --needles 10 --ask-each --lengths 131072 --depths $depths \
        --samples 2 --out "$out/niah-10-needles" --json > "$out/niah-10-needles.json" ;;
    general)  # how far it generalises: the question alone, another wording, other key and value kinds
      g="--model $model --haystack perl-docs --lengths 4096,32768,131072 --depths $depths --samples 2"
      $lm eval niah $g --ending question --max-tokens 64 --out "$out/general-question-only" --json \
        > "$out/general-question-only.json"  # the answer restates the question first: room for it
      $lm eval niah $g --needle "The secret code of {city} is {value}." --question "What is the secret code of {city}?" \
        --answer-prefix "The secret code of {city} is" --out "$out/general-wording" --json > "$out/general-wording.json"
      for k in names words uuids; do
        $lm eval niah $g --keys $k --out "$out/general-keys-$k" --json > "$out/general-keys-$k.json"
      done
      for v in words uuids; do  # a UUID is 36 bytes: room for it
        $lm eval niah $g --values $v --max-tokens 64 --out "$out/general-values-$v" --json > "$out/general-values-$v.json"
      done ;;
    ruler)  # from 8K: RULER's cwe at >= 4K lengths takes 6.7K byte tokens (its one-shot example and 10 common words)
      $lm eval ruler --model "$model" --lengths 8192,16384,32768,65536,131072 --samples 3 \
        --out "$out/ruler" --json > "$out/ruler.json" ;;
    nll)
      $lm eval nll --model "$model" --max-context 131072 --out "$out/nll" --json > "$out/nll.json" ;;
    huge)  # the stretch: 10,485,760 tokens (the report's 10M) at three depths
      $lm eval niah --model "$model" --haystack perl-docs --lengths 10485760 --depths 0,50,100 --samples 1 \
        --out "$out/niah-10m" --json > "$out/niah-10m.json" ;;
    *) echo "unknown: $w (niah long ten general ruler nll huge)" >&2; exit 2 ;;
  esac
done
