# llorch tasks. `just dev` runs the whole system locally; `just test` runs every test.
set shell := ["bash", "-euo", "pipefail", "-c"]

export CGO_CFLAGS := "-O2 -g -Wno-deprecated-declarations"
export PATH := justfile_directory() + "/bin:" + env_var("PATH")
# The Go toolchain every recipe builds with (go.mod's toolchain line; the go
# command fetches it once through the module proxy).
go_toolchain := "go1.27.3"
export GOTOOLCHAIN := go_toolchain

temporal_version := "v1.5.1"
versitygw_version := "v1.8.0"
govulncheck_version := "v1.9.0"
llama_npm_version := "3.21.1"
openai_npm_version := "6.30.1"
# The e2e tests that are failure scenarios too (`just chaos` reruns them).
# The e2e tests `just test` runs again through 3 apiserver replicas behind the balancer.
replicas_e2e := "TestTasksV2|TestOpenAICompatible|TestAdmissionPriorityPlacementDeadline|TestTaskMovesOffLostNode|TestReplicaKillMidStream"
chaos_e2e := "TestReplicaKillMidStream|TestTaskMovesOffLostNode|TestPoolLifecycle|TestPoolEngineAdoptedFencedOrphaned|TestAPIServerRestartMidStream|TestNetworkCut|TestStagingJoinsAndResumes|TestStagingFailuresAreClean"

default:
    @just --list

# Install the pinned temporal CLI, versitygw, govulncheck and libllama (./bin/llama) when missing.
tools:
    #!/usr/bin/env bash
    set -euo pipefail
    mkdir -p bin
    if [ ! -f bin/.temporal-{{temporal_version}} ] || [ ! -x bin/temporal ]; then
      echo "installing temporal CLI {{temporal_version}} into ./bin (first time: about 11 minutes)"
      GOBIN="$PWD/bin" go install github.com/temporalio/cli/cmd/temporal@{{temporal_version}}
      touch bin/.temporal-{{temporal_version}}
    fi
    if [ ! -f bin/.versitygw-{{versitygw_version}} ] || [ ! -x bin/versitygw ]; then
      echo "installing versitygw {{versitygw_version}} into ./bin (first time: about 2 minutes)"
      GOBIN="$PWD/bin" go install github.com/versity/versitygw/cmd/versitygw@{{versitygw_version}}
      touch bin/.versitygw-{{versitygw_version}}
    fi
    # Built with the toolchain it checks: one built by an older Go cannot load newer sources.
    if [ ! -f bin/.govulncheck-{{govulncheck_version}}-{{go_toolchain}} ] || [ ! -x bin/govulncheck ]; then
      echo "installing govulncheck {{govulncheck_version}} into ./bin"
      rm -f bin/govulncheck
      GOBIN="$PWD/bin" go install golang.org/x/vuln/cmd/govulncheck@{{govulncheck_version}}
      touch bin/.govulncheck-{{govulncheck_version}}-{{go_toolchain}}
    fi
    # libllama for `llorch engine`: node-llama-cpp's prebuilt CPU build, driven by yzma (purego).
    if [ ! -f bin/.llama-npm-{{llama_npm_version}} ] || [ ! -e bin/llama/libllama.so ]; then
      echo "installing @node-llama-cpp/linux-x64@{{llama_npm_version}} (libllama) into ./bin/llama"
      npm install --silent --no-audit --no-fund --no-save --prefix bin/llama-npm @node-llama-cpp/linux-x64@{{llama_npm_version}} >/dev/null
      rm -rf bin/llama && mkdir -p bin/llama
      # Every library beside each other: libllama finds libggml via $ORIGIN, and
      # ggml loads its CPU variants (libggml-cpu-*.so) from the same directory.
      for f in bin/llama-npm/node_modules/@node-llama-cpp/linux-x64/bins/linux-x64/*.so; do
        ln -s "../llama-npm/node_modules/@node-llama-cpp/linux-x64/bins/linux-x64/$(basename "$f")" bin/llama/
      done
      ln -s libllama.v0.4.0.so bin/llama/libllama.so
      ln -s libggml.v0.4.0.so bin/llama/libggml.so
      touch bin/.llama-npm-{{llama_npm_version}}
    fi
    # The official OpenAI npm client, which e2e/npm/openai.cjs drives (TestOpenAINPMClient).
    if [ ! -f bin/.openai-npm-{{openai_npm_version}} ] || [ ! -d bin/openai-npm/node_modules/openai ]; then
      echo "installing openai@{{openai_npm_version}} (npm) into ./bin/openai-npm"
      npm install --silent --no-audit --no-fund --no-save --prefix bin/openai-npm openai@{{openai_npm_version}} >/dev/null
      touch bin/.openai-npm-{{openai_npm_version}}
    fi

# Build the llorch binary into ./bin.
build:
    go build -o bin/llorch ./cmd/llorch

# Run the whole system on this machine: Temporal, S3, apiserver, one node worker.
dev *ARGS: tools build
    ./bin/llorch dev {{ARGS}}

# Add another node to a running `just dev` cluster.
worker NODE_ID *ARGS: build
    ./bin/llorch worker --node-id {{NODE_ID}} {{ARGS}}

# Static checks: go vet and Temporal's workflowcheck.
lint:
    go vet ./...
    go tool workflowcheck ./...

# Known vulnerabilities the code reaches in its dependencies (govulncheck over a database built from a pinned golang.org/x/vulndb; the Go toolchain's own are listed, waived until it moves).
vulncheck: tools
    go run ./devtools/vulncheck

# Every test: static checks, unit, workflow, API, e2e, replay, the task e2e tests through 3 apiserver replicas, then the chaos scenarios once.
test: tools lint vulncheck
    go test -count=1 -timeout 30m ./...
    LLORCH_E2E_APISERVERS=3 go test -count=1 -timeout 20m -run '^({{replicas_e2e}})$' ./e2e
    LLORCH_CHAOS=1 go test -count=1 -timeout 20m ./chaos
    just fuzz

# The fuzz campaign: the corpus once (fails fast, with the stack's logs, when the stack cannot start), then FuzzAPI against a running apiserver for TIME, then the parsers' fuzz targets 5 s each. New inputs go to Go's fuzz cache, not the repo; a failing one is written to the package's testdata/fuzz (commit it with the fix).
fuzz TIME="60s": tools
    #!/usr/bin/env bash
    set -euo pipefail
    mkdir -p bench/out
    # Each campaign's -timeout: its time plus 5 minutes (the stack's start and
    # the minimisation of a crasher), 20m when TIME is a count of executions.
    limit() {
      local t=$1
      case $t in
        *[0-9]s) echo "$(( ${t%s} + 300 ))s" ;;
        *[0-9]m) echo "$(( ${t%m} * 60 + 300 ))s" ;;
        *[0-9]h) echo "$(( ${t%h} * 3600 + 300 ))s" ;;
        *) echo 20m ;;
      esac
    }
    start=$SECONDS
    # Under -fuzz a worker whose stack cannot start is restarted by the
    # coordinator again and again ("gathering baseline coverage: 0/N"): run
    # the corpus once without -fuzz first, which fails at once.
    echo "fuzz: FuzzAPI corpus (./fuzz)"
    if ! go test -count=1 -run '^FuzzAPI$' -timeout 5m ./fuzz >bench/out/fuzz-corpus.log 2>&1; then
      tail -n 80 bench/out/fuzz-corpus.log
      echo "fuzz: the FuzzAPI corpus failed (log: bench/out/fuzz-corpus.log)"
      exit 1
    fi
    echo "fuzz: FuzzAPI corpus passed in $(( SECONDS - start ))s"
    campaign() { # package, target, time
      local log="bench/out/fuzz-$2.log" t0=$SECONDS
      echo "fuzz: $2 ($1) for $3"
      # One worker: FuzzAPI's stack (Temporal, S3, apiserver, a node) runs once per worker.
      # Few minimising runs: the apiserver's own goroutines make most inputs look new.
      # timeout(1) as well as -timeout: go's fuzz coordinator can wait forever
      # on a worker that is gone (-timeout does not fire there); QUIT dumps it.
      if ! timeout --signal=QUIT --kill-after=30s "$(limit "$3")" \
          go test -run '^$' -fuzz "^$2\$" -fuzztime "$3" -fuzzminimizetime 20x -parallel 1 -timeout "$(limit "$3")" "$1" >"$log" 2>&1; then
        tail -n 60 "$log"
        echo "fuzz: $2 failed (log: $log)"
        exit 1
      fi
      local last
      last=$(grep -E 'execs: [0-9]+' "$log" | tail -n 1 || true)
      echo "fuzz: $2 done in $(( SECONDS - t0 ))s: ${last#*elapsed: }"
    }
    campaign ./fuzz FuzzAPI "{{TIME}}"
    campaign ./apiserver FuzzTaskRequest 5s
    campaign ./apiserver FuzzOpenAIRequest 5s
    campaign ./engine FuzzCompletionDecoders 5s
    campaign ./grammar FuzzFromSchema 5s
    echo "fuzz: all done in $(( SECONDS - start ))s"

# Benchmarks against baselines in the same run, ending with a table of aims (results: bench/out/results.json).
bench: tools
    go test -run '^$' -bench 'TimeToFirstToken' -benchtime 200x -timeout 20m ./bench
    go test -run '^$' -bench 'CPUPerToken' -benchtime 20x -timeout 20m ./bench
    go test -run '^$' -bench 'StreamingThroughput' -benchtime 50x ./bench
    go test -run '^$' -bench 'Concurrency' -benchtime 3x -timeout 20m ./bench
    go test -run '^$' -bench 'DetectionAndHandoff' -benchtime 10x -timeout 20m ./bench
    go test -run '^$' -bench 'Staging' -benchtime 3x ./bench
    go test -run '^$' -bench 'ControlPlaneIdle' -benchtime 1x -timeout 20m ./bench
    go test -run '^$' -bench 'Replicas' -benchtime 1x -timeout 20m ./bench
    go test -run '^$' -bench 'SessionRouting' -benchtime 1x -timeout 20m ./bench
    go test -run '^$' -bench . ./placement
    go test -run '^$' -bench Admit1000Nodes -benchtime 2000x ./scheduler
    @echo "results: bench/out/results.json"
    go run ./bench/table

# Where the time goes: the first-token, CPU-per-token and concurrency benchmarks with CPU shares by process and CPU profiles of the apiservers (fast path on and off) and a worker.
bench-profile: tools
    LLORCH_BENCH_PROFILE="$PWD/bench/out/prof" go test -run '^$' -bench 'TimeToFirstToken' -benchtime 200x -timeout 20m -v ./bench
    LLORCH_BENCH_PROFILE="$PWD/bench/out/prof" go test -run '^$' -bench 'CPUPerToken' -benchtime 20x -timeout 20m -v ./bench
    LLORCH_BENCH_PROFILE="$PWD/bench/out/prof" go test -run '^$' -bench 'Concurrency' -benchtime 3x -timeout 20m -v ./bench
    go tool pprof -top -nodecount 25 bench/out/prof/ttft-apiserver.pprof
    go tool pprof -top -nodecount 25 bench/out/prof/ttft-apiserver-fast-off.pprof
    go tool pprof -top -nodecount 25 bench/out/prof/ttft-worker.pprof
    go tool pprof -top -nodecount 25 bench/out/prof/cpu-per-token-apiserver.pprof
    go tool pprof -top -nodecount 25 bench/out/prof/cpu-per-token-worker.pprof
    go tool pprof -top -nodecount 25 bench/out/prof/concurrency-apiserver.pprof

# (The e2e failure scenarios, then the chaos package, TRIALS times each.)
# The failure suite, with its summary table: scenario, trials, passed, time to recover.
chaos TRIALS="1": tools
    #!/usr/bin/env bash
    set -uo pipefail
    mkdir -p bench/out
    export LLORCH_CHAOS_REPORT="$PWD/bench/out/chaos.jsonl"
    rm -f "$LLORCH_CHAOS_REPORT"
    go test -count={{TRIALS}} -timeout 90m -v -run '^({{chaos_e2e}})$' ./e2e
    e2e=$?
    LLORCH_CHAOS=1 go test -count={{TRIALS}} -timeout 90m -v ./chaos
    chaos=$?
    exit $(( e2e != 0 || chaos != 0 ))

# Re-record the workflow histories the replay tests use, from a real run.
record-histories: tools
    LLORCH_RECORD_HISTORIES=1 go test -count=1 -run 'TestThreeNodesJoinDieReturnLeave|TestContinueAsNewKeepsState|TestHTTPAgentRecorded|TestStagingJoinsAndResumes|TestStagingFailuresAreClean|TestGC|TestPoolLifecycle|TestPoolDrainWaitsForInFlight|TestPoolReload|TestPoolEngineAdoptedFencedOrphaned|TestTasksV2|TestTaskMovesOffLostNode|TestAdmissionPriorityPlacementDeadline|TestAPIServerRestartMidStream|TestSessionsSharedByReplicas' ./e2e
    go test -count=1 ./replay_tests
