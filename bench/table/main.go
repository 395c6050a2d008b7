// Command table prints the summary of `just bench`: each figure beside its
// baseline and its aim, from bench/out/results.json.
package main

import (
	"encoding/json"
	"fmt"
	"os"
)

type results map[string]map[string]any

func (r results) num(bench, key string) (float64, bool) {
	v, ok := r[bench][key].(float64)
	return v, ok
}

// row is one line of the table; value renders the figures, met says
// whether the aim holds (nil: no aim).
type row struct {
	what, bench string
	keys        []string
	value       func(v []float64) (llorch, baseline, ratio string)
	aim         string
	met         func(v []float64) bool
}

func main() {
	path := "bench/out/results.json"
	if len(os.Args) > 1 {
		path = os.Args[1]
	}
	raw, err := os.ReadFile(path)
	if err != nil {
		fmt.Fprintln(os.Stderr, "bench table:", err)
		os.Exit(1)
	}
	var r results
	if err := json.Unmarshal(raw, &r); err != nil {
		fmt.Fprintln(os.Stderr, "bench table:", path+":", err)
		os.Exit(1)
	}
	wide := 50 // BenchmarkTimeToFirstToken's -ttft-wide
	if w, ok := r.num("ttft", "wide"); ok {
		wide = int(w)
	}
	rows := []row{
		ttftRow("/v2 (submit + SSE)", "v2", 1), ttftRow("/v2 (submit + SSE)", "v2", wide),
		ttftRow("/v1 streaming", "v1", 1), ttftRow("/v1 streaming", "v1", wide),
		{"Temporal's own floor", "ttft", []string{"temporal_empty_wf", "temporal_1act_wf"},
			func(v []float64) (string, string, string) {
				return "", fmt.Sprintf("empty workflow %.1f ms, one activity %.1f ms", v[0], v[1]), ""
			}, "", nil},
		{"CPU per streamed token outside the engine (marginal above idle, long vs short streams)", "cpu_per_token",
			[]string{"fast_marginal_above_idle_us_workers", "fast_marginal_above_idle_us_apiserver", "fast_marginal_above_idle_us_temporal",
				"fast_marginal_above_idle_us_sum", "slow_marginal_above_idle_us_sum", "fast_marginal_us_sum", "fast_above_idle_us_sum", "long_tokens"},
			func(v []float64) (string, string, string) {
				return fmt.Sprintf("fast on: workers %.1f + apiserver %.1f + Temporal %.1f = %.1f µs", v[0], v[1], v[2], v[3]),
					fmt.Sprintf("fast off: %.1f µs", v[4]),
					fmt.Sprintf("fast on, idle included: %.1f µs; above idle over %.0f-token streams: %.1f µs", v[5], v[7], v[6])
			}, "<= 50 µs (sum, fast on)", func(v []float64) bool { return v[3] <= 50 }},
		{"CPU per task outside the engine (above idle, its tokens left out)", "cpu_per_token",
			[]string{"fast_task_ms_workers", "fast_task_ms_apiserver", "fast_task_ms_temporal", "fast_task_ms_sum", "slow_task_ms_sum"},
			func(v []float64) (string, string, string) {
				return fmt.Sprintf("fast on: workers %.1f + apiserver %.1f + Temporal %.1f = %.1f ms", v[0], v[1], v[2], v[3]),
					fmt.Sprintf("fast off: %.1f ms", v[4]), ""
			}, "", nil},
		{"streaming throughput, 256 tokens, engine on its own CPU (--engine-cpus)", "throughput_engine_cpus", []string{"llorch_tok_s", "direct_tok_s", "ratio"},
			func(v []float64) (string, string, string) {
				return fmt.Sprintf("%.0f tok/s", v[0]), fmt.Sprintf("%.0f tok/s direct", v[1]), fmt.Sprintf("%.2f", v[2])
			}, ">= 0.97", func(v []float64) bool { return v[2] >= 0.97 }},
		{"streaming throughput, 256 tokens, all processes on all CPUs", "throughput", []string{"llorch_tok_s", "direct_tok_s", "ratio", "engine_decode_llorch_tok_s", "engine_decode_direct_tok_s"},
			func(v []float64) (string, string, string) {
				return fmt.Sprintf("%.0f tok/s", v[0]), fmt.Sprintf("%.0f tok/s direct", v[1]),
					fmt.Sprintf("%.2f (the engine's own decode rate: %.2f)", v[2], v[3]/v[4])
			}, ">= 0.95", func(v []float64) bool { return v[2] >= 0.95 }},
		{"200 concurrent tasks, 10 node workers", "concurrency", []string{"tasks", "completed", "failed", "lost", "e2e_p50_ms", "e2e_p99_ms"},
			func(v []float64) (string, string, string) {
				return fmt.Sprintf("%.0f of %.0f completed, %.0f failed, %.0f lost; p50 %.2f s, p99 %.2f s", v[1], v[0], v[2], v[3], v[4]/1000, v[5]/1000), "", ""
			}, "0 lost", func(v []float64) bool { return v[3] == 0 }},
		{"task throughput, 200 concurrent tasks", "concurrency", []string{"tasks_per_s", "bare_1act_wf_per_s", "throughput_ratio", "lost"},
			func(v []float64) (string, string, string) {
				return fmt.Sprintf("%.1f tasks/s, %.0f lost", v[0], v[3]), fmt.Sprintf("%.1f one-activity workflows/s", v[1]), fmt.Sprintf("%.2f (median of rounds)", v[2])
			}, ">= 1.0, 0 lost", func(v []float64) bool { return v[2] >= 1.0 && v[3] == 0 }},
		{"node failure detection (kill -9)", "detection_handoff", []string{"detection_p50_s", "detection_max_s", "trials"},
			func(v []float64) (string, string, string) {
				return fmt.Sprintf("p50 %.2f s, max %.2f s (%.0f trials)", v[0], v[1], v[2]), "", ""
			}, "<= 10 s (aim 5 s)", func(v []float64) bool { return v[1] <= 10 }},
		{"handoff (first /health 200 -> Ready)", "detection_handoff", []string{"handoff_p50_ms", "handoff_p99_ms"},
			func(v []float64) (string, string, string) {
				return fmt.Sprintf("p50 %.1f ms, p99 %.1f ms", v[0], v[1]), "", ""
			}, "", nil},
		{"staging", "staging", []string{"llorch_mb_s", "fget_mb_s", "ratio_vs_fget", "ratio_vs_fget_fsync"},
			func(v []float64) (string, string, string) {
				return fmt.Sprintf("%.0f MB/s", v[0]), fmt.Sprintf("FGetObject %.0f MB/s", v[1]), fmt.Sprintf("%.2f (%.2f vs FGetObject + fsync)", v[2], v[3])
			}, ">= 0.9", func(v []float64) bool { return v[2] >= 0.9 }},
		{"control plane idle, 0 nodes", "control_plane_idle", []string{"n0_apiserver_cores", "n0_temporal_cores", "n0_control_plane_cores"},
			func(v []float64) (string, string, string) {
				return fmt.Sprintf("apiserver %.3f + Temporal %.3f = %.3f cores", v[0], v[1], v[2]), "", ""
			}, "", nil},
		idleRow(100, "", nil),
		idleRow(1000, "apiserver + Temporal < 1 core at 1000 nodes, all Online", func(v []float64) bool { return v[2] < 1 && v[8] == v[4] }),
		{"multi-turn chat over 2 pools, first token: cache-aware (kv_hint reuse) vs load-only (cold)", "sessions",
			[]string{"reuse_ttft_p50_ms", "reuse_ttft_p99_ms", "cold_ttft_p50_ms", "cold_ttft_p99_ms", "ttft_p50_ratio", "ttft_p99_ratio", "sessions", "turns", "reuse_history_tokens_max", "reuse_cached_share"},
			func(v []float64) (string, string, string) {
				return fmt.Sprintf("p50 %.0f, p99 %.0f ms, %.0f%% of prompt tokens cached (%.0f sessions of %.0f turns, history up to %.0f tokens)",
						v[0], v[1], 100*v[9], v[6], v[7], v[8]),
					fmt.Sprintf("load-only p50 %.0f, p99 %.0f ms", v[2], v[3]), fmt.Sprintf("p50 %.2f, p99 %.2f", v[4], v[5])
			}, "p50 <= 0.33", func(v []float64) bool { return v[4] <= 0.33 }},
		{"multi-turn chat over 2 pools, workload throughput", "sessions",
			[]string{"reuse_tok_out_s", "reuse_tok_in_s", "cold_tok_out_s", "cold_tok_in_s", "throughput_ratio", "reuse_wall_s", "cold_wall_s"},
			func(v []float64) (string, string, string) {
				return fmt.Sprintf("%.1f generated tok/s, %.0f prompt tok/s (%.0f s)", v[0], v[1], v[5]),
					fmt.Sprintf("load-only %.1f generated tok/s, %.0f prompt tok/s (%.0f s)", v[2], v[3], v[6]), fmt.Sprintf("%.2f", v[4])
			}, ">= 1.5", func(v []float64) bool { return v[4] >= 1.5 }},
		{"over-commit: 3 replicas admit 200 tasks, most generations at once per pool", "replicas", []string{"max_in_flight", "max_processing", "max_link_busy", "slots", "samples", "lost", "tasks"},
			func(v []float64) (string, string, string) {
				return fmt.Sprintf("%.0f sent to an engine, %.0f processing (/slots), %.0f busy (node link); %.0f of %.0f lost", v[0], v[1], v[2], v[5], v[6]),
					fmt.Sprintf("%.0f slots per pool", v[3]), fmt.Sprintf("%.0f reads", v[4])
			}, "max concurrent <= slots", func(v []float64) bool { return v[0] <= v[3] && v[1] <= v[3] && v[2] <= v[3] }},
		{"priority under saturation, 3 replicas: median queue wait", "replicas", []string{"interactive_wait_p50_ms", "batch_wait_p50_ms", "wait_ratio"},
			func(v []float64) (string, string, string) {
				return fmt.Sprintf("interactive p50 %.0f ms", v[0]), fmt.Sprintf("batch p50 %.0f ms", v[1]), fmt.Sprintf("%.3f", v[2])
			}, "interactive/batch <= 0.2", func(v []float64) bool { return v[2] <= 0.2 }},
		{"FIFO within a priority, 3 replicas (same pool)", "replicas", []string{"fifo_interactive_pair_inversions", "fifo_batch_pair_inversions", "fifo_pair_inversions", "fifo_task_inversions"},
			func(v []float64) (string, string, string) {
				return fmt.Sprintf("pairs inverted: interactive %.2f%%, batch %.2f%% (both %.2f%%)", 100*v[0], 100*v[1], 100*v[2]), "",
					fmt.Sprintf("%.2f%% of tasks started before an earlier one", 100*v[3])
			}, "pairs inverted < 5% in each priority", func(v []float64) bool { return v[0] < 0.05 && v[1] < 0.05 }},
	}
	fmt.Println("| what | llorch | baseline | ratio / overhead | aim | met |")
	fmt.Println("|---|---|---|---|---|---|")
	missed := 0
	for _, row := range rows {
		v := make([]float64, len(row.keys))
		ok := true
		for i, k := range row.keys {
			v[i], ok = r.num(row.bench, k)
			if !ok {
				break
			}
		}
		if !ok {
			fmt.Printf("| %s | (not run) | | | %s | |\n", row.what, row.aim)
			continue
		}
		l, b, ratio := row.value(v)
		met := ""
		if row.met != nil {
			met = "yes"
			if !row.met(v) {
				met, missed = "**no**", missed+1
			}
		}
		fmt.Printf("| %s | %s | %s | %s | %s | %s |\n", row.what, l, b, ratio, row.aim, met)
	}
	if missed > 0 {
		fmt.Printf("\n%d aim(s) missed: see docs/benchmarks.md for why.\n", missed)
	}
}

// idleRow is BenchmarkControlPlaneIdle at n simulated nodes beside its
// 0-node run: cores of apiserver and Temporal, nodes Online (at the end of
// the window and the fewest during it), cost per node.
func idleRow(n int, aim string, met func(v []float64) bool) row {
	k := fmt.Sprintf("n%d_", n)
	return row{fmt.Sprintf("control plane idle, %d simulated nodes (1 s heartbeats)", n), "control_plane_idle",
		[]string{k + "apiserver_cores", k + "temporal_cores", k + "control_plane_cores", k + "online", k + "nodes",
			"n0_control_plane_cores", k + "marginal_ms_per_s_per_node", k + "simulator_cores", k + "online_fewest_in_window", k + "cluster_view_every_s"},
		func(v []float64) (string, string, string) {
			return fmt.Sprintf("apiserver %.3f + Temporal %.3f = %.3f cores; %.0f of %.0f Online at the end, fewest %.0f; cluster view read every %.1f s (simulator %.2f cores)",
					v[0], v[1], v[2], v[3], v[4], v[8], v[9], v[7]),
				fmt.Sprintf("0 nodes: %.3f cores", v[5]), fmt.Sprintf("+%.2f ms CPU/s per node", v[6])
		}, aim, met}
}

// ttftRow is BenchmarkTimeToFirstToken's first token of path ("v2" or
// "v1") at conc concurrent requests: the fast path on and off beside the
// direct engine (and, for /v2, the bare StartWorkflow; for /v1, the
// direct engine through two bare proxy hops) of the same run.
// The aim is issue 13's, on the fast path.
func ttftRow(what, path string, conc int) row {
	p := fmt.Sprintf("c%d_", conc)
	on, off := p+path+"_fast", p+path+"_slow"
	aim := "fast on: overhead p50 <= 5 ms, p99 <= 20 ms"
	if path == "v2" {
		aim = "fast on: overhead <= StartWorkflow + 2 ms (p50), + 5 ms (p99)"
	}
	keys := []string{on + "_p50_ms", on + "_p99_ms", off + "_p50_ms", off + "_p99_ms", p + "direct_p50_ms", p + "direct_p99_ms",
		p + "start_wf_p50_ms", p + "start_wf_p99_ms", on + "_overhead_p50_ms", on + "_overhead_p99_ms",
		off + "_overhead_p50_ms", off + "_overhead_p99_ms", on + "_aim_p50_ms", on + "_aim_p99_ms"}
	if path == "v2" {
		keys = append(keys, on+"_submit_p50_ms", off+"_submit_p50_ms")
	} else {
		keys = append(keys, p+"two_hops_overhead_p50_ms", p+"two_hops_overhead_p99_ms")
	}
	return row{fmt.Sprintf("first token %s, %d concurrent", what, conc), "ttft", keys,
		func(v []float64) (string, string, string) {
			base := fmt.Sprintf("engine direct p50 %.1f, p99 %.1f ms", v[4], v[5])
			llorch := fmt.Sprintf("fast on: p50 %.1f, p99 %.1f ms; off: p50 %.1f, p99 %.1f ms", v[0], v[1], v[2], v[3])
			if path == "v2" {
				base += fmt.Sprintf("; StartWorkflow p50 %.1f, p99 %.1f ms", v[6], v[7])
				llorch += fmt.Sprintf(" (the 202: p50 %.1f and %.1f ms)", v[14], v[15])
			} else {
				base += fmt.Sprintf("; two bare proxy hops add %+.1f / %+.1f ms", v[14], v[15])
			}
			return llorch, base,
				fmt.Sprintf("on: %+.1f / %+.1f ms (aim %.1f / %.1f); off: %+.1f / %+.1f ms", v[8], v[9], v[12], v[13], v[10], v[11])
		}, aim, func(v []float64) bool { return v[8] <= v[12] && v[9] <= v[13] }}
}
