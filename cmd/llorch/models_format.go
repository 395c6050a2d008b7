package main

import (
	"fmt"
	"io"
	"strconv"
	"text/tabwriter"
	"time"

	"github.com/llorch/llorch/model"
)

func printCatalogEntry(w io.Writer, title string, e model.Entry, bucket string) {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, title)
	fmt.Fprintf(tw, "  id\t%s\n", e.ID)
	fmt.Fprintf(tw, "  object\ts3://%s/%s\n", bucket, e.Key)
	fmt.Fprintf(tw, "  sha256\t%s\n", e.SHA256)
	fmt.Fprintf(tw, "  size\t%s (%d bytes)\n", modelsBytes(e.Size), e.Size)
	fmt.Fprintf(tw, "  architecture\t%s\n", modelsDash(e.Metadata.Architecture))
	fmt.Fprintf(tw, "  parameters\t%s\n", modelsParams(e.Metadata.Parameters))
	if e.Metadata.Quantization != "" {
		fmt.Fprintf(tw, "  quantization\t%s\n", e.Metadata.Quantization)
	}
	if e.Metadata.ContextLength > 0 {
		fmt.Fprintf(tw, "  context length\t%d\n", e.Metadata.ContextLength)
	}
	if e.Lifecycle != "" {
		fmt.Fprintf(tw, "  lifecycle\t%s\n", e.Lifecycle)
	}
	_ = tw.Flush()
}

func modelsDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

// modelsBytes is a size in IEC units: 4.6 GiB.
func modelsBytes(n int64) string {
	if n < 1024 {
		return fmt.Sprintf("%d B", n)
	}
	v, unit := float64(n), ""
	for _, u := range []string{"KiB", "MiB", "GiB", "TiB", "PiB"} {
		v /= 1024
		unit = u
		if v < 1024 {
			break
		}
	}
	if v < 10 {
		return fmt.Sprintf("%.1f %s", v, unit)
	}
	return fmt.Sprintf("%.0f %s", v, unit)
}

// modelsParams is a parameter count: 8.03B, 124M; "-" when unknown.
func modelsParams(n uint64) string {
	switch {
	case n == 0:
		return "-"
	case n >= 1e12:
		return fmt.Sprintf("%.2fT", float64(n)/1e12)
	case n >= 1e9:
		return fmt.Sprintf("%.2fB", float64(n)/1e9)
	case n >= 1e6:
		return fmt.Sprintf("%.1fM", float64(n)/1e6)
	case n >= 1e3:
		return fmt.Sprintf("%.1fK", float64(n)/1e3)
	}
	return strconv.FormatUint(n, 10)
}

func modelsTime(t time.Time) string {
	if t.IsZero() {
		return "-"
	}
	return t.Local().Format("2006-01-02 15:04")
}
