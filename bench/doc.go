// Package bench holds llorch's benchmarks. Each compares llorch with a
// baseline in the same run and reports the ratio: `just bench`.
package bench
