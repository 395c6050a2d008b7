package modelstore

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math"
	"net"
	"net/url"
	"os"
	"regexp"
	"strings"

	parser "github.com/gpustack/gguf-parser-go"

	"github.com/llorch/llorch/model"
)

// ErrNotGGUF is wrapped by every error that says a file or object is not a
// GGUF model (bad magic, truncated or malformed header); I/O and HTTP
// failures do not wrap it, so a caller can tell "retry" from "reject".
var ErrNotGGUF = errors.New("not a GGUF file")

// defaultEstimateContext caps the context of the VRAM estimate when the
// caller names none: a model's trained context (128k and more) would price
// a KV cache nobody runs by default.
const defaultEstimateContext = 4096

// ReadMetadata reads the GGUF header of a local file and estimates what
// llama.cpp needs to run it fully offloaded at estimateContext tokens
// (0: min(4096, the model's context length)).
func ReadMetadata(path string, estimateContext uint64) (model.Metadata, error) {
	// Read the magic ourselves: the parser only says "invalid GGUF format",
	// and a missing or unreadable file must not read as "not GGUF".
	f, err := os.Open(path)
	if err != nil {
		return model.Metadata{}, err
	}
	var magic [4]byte
	n, err := io.ReadFull(f, magic[:])
	f.Close()
	switch {
	case errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF):
		return model.Metadata{}, fmt.Errorf("%w: %s is %d bytes long, too short for a GGUF header", ErrNotGGUF, path, n)
	case err != nil:
		return model.Metadata{}, err
	case string(magic[:]) != "GGUF":
		return model.Metadata{}, fmt.Errorf("%w: %s starts with magic %q, not \"GGUF\"", ErrNotGGUF, path, magic[:])
	}
	return metadata(estimateContext, func() (*parser.GGUFFile, error) {
		// SkipLargeMetadata: the token list and merges are not needed for
		// the metadata or the estimate (their lengths are kept).
		return parser.ParseGGUFFile(path, parser.SkipLargeMetadata())
	}, func(err error) error {
		// The file opened and starts with GGUF: whatever fails now is its
		// content.
		return fmt.Errorf("%w: %s: %w", ErrNotGGUF, path, err)
	})
}

// ReadMetadataRemote is ReadMetadata for an object behind an HTTP(S) URL, such
// as a presigned S3 GET URL: after one GET that is closed once its headers
// give the length, it reads the header with ranged GETs of up to 4 MiB, not
// the whole object. The parser's client retries connection errors and 5xx
// answers for about 6 s unless ctx ends first. Error messages carry the URL
// without its query (a presigned URL's query is a credential).
func ReadMetadataRemote(ctx context.Context, rawURL string, estimateContext uint64) (model.Metadata, error) {
	where := redactURL(rawURL)
	return metadata(estimateContext, func() (*parser.GGUFFile, error) {
		return parser.ParseGGUFFileRemote(ctx, rawURL,
			// The parser's range detection sends a HEAD request, which a
			// presigned GET URL refuses (the signature covers the method).
			parser.SkipRangeDownloadDetection(),
			parser.SkipLargeMetadata(),
			parser.SkipCache())
	}, func(err error) error {
		msg := strings.ReplaceAll(err.Error(), rawURL, where)
		switch {
		case ctx.Err() != nil:
			return fmt.Errorf("read GGUF header of %s: %w", where, ctx.Err())
		case isTransportError(err):
			return fmt.Errorf("read GGUF header of %s: %s", where, msg)
		}
		// A connection cut mid-body also ends in an unexpected EOF, which
		// reads the same as a truncated object; the header is small, so
		// this is rare, and a retry tells them apart.
		return fmt.Errorf("%w: %s: %s", ErrNotGGUF, where, msg)
	})
}

// metadata parses with parse, classifies its error with fail, and fills a
// model.Metadata with an estimate.
func metadata(estimateContext uint64, parse func() (*parser.GGUFFile, error), fail func(error) error) (md model.Metadata, err error) {
	// The parser panics on some malformed headers (a key of an unexpected
	// type, sizes that overflow): that is a bad file, not a crash.
	defer func() {
		if r := recover(); r != nil {
			md, err = model.Metadata{}, fail(fmt.Errorf("malformed header: %v", r))
		}
	}()
	gf, err := parse()
	if err != nil {
		return model.Metadata{}, fail(err)
	}
	gm := gf.Metadata()
	arch := gf.Architecture()
	md = model.Metadata{
		Architecture:  arch.Architecture,
		Name:          gm.Name,
		Parameters:    uint64(gf.ModelParameters),
		ContextLength: arch.MaximumContextLength,
		Quantization:  gm.FileTypeDescriptor, // e.g. "Q4_K_M", "F32"
		Layers:        arch.BlockCount,
	}
	if md.EstimateContext = estimateContext; md.EstimateContext == 0 {
		md.EstimateContext = defaultEstimateContext
		if c := md.ContextLength; c > 0 && c < defaultEstimateContext {
			md.EstimateContext = c
		}
	}
	est := gf.EstimateLLaMACppRun(
		parser.WithLLaMACppContextSize(int32(min(md.EstimateContext, math.MaxInt32))),
		// llama.cpp's -ngl counts the output layer too: blocks+1 is "all".
		parser.WithLLaMACppOffloadLayers(md.Layers+1),
	)
	// mmap on, as llama-server runs by default. NonUMA is the discrete-GPU
	// figure (weights, KV cache and compute buffers all on the card); the
	// platform footprints (CUDA context and the like) are left at 0.
	sum := est.SummarizeItem(true, 0, 0)
	for _, v := range sum.VRAMs {
		md.EstimatedVRAMBytes += uint64(v.NonUMA)
	}
	md.EstimatedRAMBytes = uint64(sum.RAM.NonUMA)
	return md, nil
}

// httpStatusError matches the bare "403 Forbidden" the parser's HTTP reader
// returns for a failed ranged GET.
var httpStatusError = regexp.MustCompile(`^[1-5][0-9][0-9] `)

// isTransportError tells network and HTTP failures from a bad object.
func isTransportError(err error) bool {
	var ue *url.Error
	var ne net.Error
	if errors.As(err, &ue) || errors.As(err, &ne) ||
		// Opening is a GET that must answer 200 before any byte is parsed.
		strings.HasPrefix(err.Error(), "open http file:") {
		return true
	}
	for e := err; e != nil; e = errors.Unwrap(e) {
		if errors.Unwrap(e) == nil && httpStatusError.MatchString(e.Error()) {
			return true
		}
	}
	return false
}

// redactURL drops the query (and any user info) of a URL for messages.
func redactURL(raw string) string {
	u, err := url.Parse(raw)
	if err != nil {
		return "(unparsable URL)"
	}
	u.User, u.RawQuery, u.Fragment = nil, "", ""
	return u.String()
}
