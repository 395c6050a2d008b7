package engine

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"runtime"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hybridgroup/yzma/pkg/llama"
)

// BuildInfo is what /props reports as build_info: this host, not a llama.cpp build.
const BuildInfo = "llorch-engine (libllama via node-llama-cpp 3.21.1)"

// Options configure one engine host; the flag names follow llama-server's.
type Options struct {
	ModelPath string
	Host      string // default 127.0.0.1
	Port      int    // 0 picks a free port (see Server.Addr)
	CtxSize   int    // total context, split across slots; 0: the model's trained context
	Parallel  int    // slots; default 1
	Threads   int    // decode threads; default: CPUs
	Alias     string // model name in /v1/models and chat responses; default: the file name
	Seed      int64  // default seed of requests that send none; -1: random
	LibDir    string // see LibDir
	Logger    *slog.Logger
	// Embeddings serves /v1/embeddings instead of generations,
	// mean-pooled and L2-normalized, as llama-server does with
	// --embeddings --pooling mean.
	Embeddings bool
}

// Server is a running engine host. Start binds it and answers 503 until Load
// has loaded the model.
type Server struct {
	opts    Options
	log     *slog.Logger
	ln      net.Listener
	http    *http.Server
	baseCtx context.Context
	cancel  context.CancelFunc

	mu        sync.Mutex
	ready     atomic.Bool
	closed    bool
	model     llama.Model
	vocab     llama.Vocab
	tmpl      string
	slots     []*slot
	slotCtx   int
	nCtxTrain int
	nEmbd     int
	ubatch    int // tokens of one physical batch
	// slotMu guards which slots are idle and their caches while idle;
	// released is closed (and replaced) whenever a slot turns idle.
	slotMu   sync.Mutex
	released chan struct{}
	uses     uint64

	nextTask   atomic.Int64
	processing atomic.Int64
	deferred   atomic.Int64
	// unused holds connections that have not sent a request yet: Shutdown
	// counts them busy for 5 s (net/http), though nothing runs on them.
	unused           sync.Map
	tokensPredicted  atomic.Int64
	promptTokens     atomic.Int64
	predictedMicros  atomic.Int64
	promptMicros     atomic.Int64
	requestsFinished atomic.Int64
}

// Start loads libllama, binds the listener and serves: /health answers 503
// "Loading model" until Load succeeds, as llama-server does, so a supervisor
// can watch the load. A missing libllama or a taken port fails here at once.
func Start(o Options) (*Server, error) {
	if o.ModelPath == "" {
		return nil, errors.New("no model: pass --model PATH")
	}
	if o.Host == "" {
		o.Host = "127.0.0.1"
	}
	if o.Parallel <= 0 {
		o.Parallel = 1
	}
	if o.Threads <= 0 {
		o.Threads = runtime.NumCPU()
	}
	if o.Alias == "" {
		o.Alias = o.ModelPath
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	dir, err := LibDir(o.LibDir)
	if err != nil {
		return nil, err
	}
	if err := loadLibrary(dir); err != nil {
		return nil, err
	}
	ln, err := net.Listen("tcp", net.JoinHostPort(o.Host, strconv.Itoa(o.Port)))
	if err != nil {
		return nil, fmt.Errorf("cannot listen on %s:%d: %w", o.Host, o.Port, err)
	}
	s := &Server{opts: o, log: o.Logger, ln: ln}
	s.baseCtx, s.cancel = context.WithCancel(context.Background())
	s.http = &http.Server{
		Handler:           s.routes(),
		ReadHeaderTimeout: 10 * time.Second,
		BaseContext:       func(net.Listener) context.Context { return s.baseCtx },
		ConnState: func(c net.Conn, st http.ConnState) {
			if st == http.StateNew {
				s.unused.Store(c, struct{}{})
			} else {
				s.unused.Delete(c)
			}
		},
	}
	go func() {
		if err := s.http.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			s.log.Error("engine HTTP server stopped", "err", err)
		}
	}()
	return s, nil
}

// Addr is the bound host:port.
func (s *Server) Addr() string { return s.ln.Addr().String() }

// URL is the base URL of the server.
func (s *Server) URL() string { return "http://" + s.Addr() }

// Load loads the model and creates the slots; /health turns 200 after it. A
// missing or corrupt file fails within milliseconds with the path in the error.
func (s *Server) Load() error {
	path := s.opts.ModelPath
	if err := checkGGUF(path); err != nil {
		return err
	}
	t0 := time.Now()
	mp := llama.ModelDefaultParams()
	mp.NGpuLayers = 0 // the CPU build has no GPU backend
	model, err := llama.ModelLoadFromFile(path, mp)
	if err != nil {
		return fmt.Errorf("llama.cpp cannot load model %s: %w (is it a complete GGUF file of a supported architecture?)", path, err)
	}
	nCtx := s.opts.CtxSize
	if nCtx <= 0 {
		nCtx = int(llama.ModelNCtxTrain(model))
	}
	perSlot := nCtx / s.opts.Parallel
	if perSlot < 16 {
		llama.ModelFree(model)
		return fmt.Errorf("context of %d tokens split over %d slots leaves %d per slot: too small (need 16)", nCtx, s.opts.Parallel, perSlot)
	}
	var slots []*slot
	for i := range s.opts.Parallel {
		cp := llama.ContextDefaultParams()
		cp.NCtx = uint32(perSlot)
		cp.NBatch = uint32(min(perSlot, 512))
		cp.NUbatch = cp.NBatch
		cp.NSeqMax = 1
		if s.opts.Embeddings {
			cp.Embeddings = 1
			cp.PoolingType = llama.PoolingTypeMean
		}
		cp.NThreads = int32(s.opts.Threads)
		cp.NThreadsBatch = int32(s.opts.Threads)
		lctx, err := llama.InitFromModel(model, cp)
		if err != nil {
			for _, sl := range slots {
				llama.Free(sl.ctx)
			}
			llama.ModelFree(model)
			return fmt.Errorf("creating llama context %d for %s (n_ctx %d): %w", i, path, perSlot, err)
		}
		slots = append(slots, &slot{id: i, ctx: lctx, vocab: llama.ModelGetVocab(model), nCtx: int(llama.NCtx(lctx))})
	}

	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		for _, sl := range slots {
			llama.Free(sl.ctx)
		}
		llama.ModelFree(model)
		return errors.New("engine closed while loading")
	}
	s.model, s.vocab, s.slots, s.slotCtx = model, llama.ModelGetVocab(model), slots, slots[0].nCtx
	s.nEmbd, s.ubatch = int(llama.ModelNEmbd(model)), int(llama.NBatch(slots[0].ctx)) // n_ubatch is n_batch here
	s.tmpl = llama.ModelChatTemplate(model, "")
	s.nCtxTrain = int(llama.ModelNCtxTrain(model))
	s.released = make(chan struct{})
	s.ready.Store(true)
	s.log.Info("model loaded", "model", path, "slots", len(slots), "n_ctx_slot", s.slotCtx,
		"threads", s.opts.Threads, "took", time.Since(t0).Round(time.Millisecond), "url", s.URL())
	return nil
}

// checkGGUF fails fast, with the path, on a file that cannot be a model.
func checkGGUF(path string) error {
	f, err := os.Open(path)
	if err != nil {
		return fmt.Errorf("cannot open model: %w", err)
	}
	defer f.Close()
	var magic [4]byte
	if _, err := io.ReadFull(f, magic[:]); err != nil || string(magic[:]) != "GGUF" {
		return fmt.Errorf("model %s is not a GGUF file (it does not start with the GGUF magic)", path)
	}
	var version uint32
	if err := binary.Read(f, binary.LittleEndian, &version); err != nil || version < 2 || version > 3 {
		return fmt.Errorf("model %s: unsupported or truncated GGUF header (version %d)", path, version)
	}
	return nil
}

// Close stops serving, cancels running generations, and frees the model once
// every slot is idle again.
func (s *Server) Close() error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil
	}
	s.closed = true
	s.mu.Unlock()
	s.cancel()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	// A client's spare connection (dialed, never used) would hold Shutdown
	// for its whole timeout; no request can start on it now anyway.
	s.unused.Range(func(c, _ any) bool { _ = c.(net.Conn).Close(); return true })
	err := s.http.Shutdown(ctx)
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.ready.Load() {
		// Handlers have returned (or Shutdown timed out): take every slot back
		// so no generation still uses a context being freed.
		for i := range s.slots {
			if _, err := s.acquire(ctx, i, nil); err != nil {
				return errors.New("engine close: a generation did not stop within 5s")
			}
		}
		for _, sl := range s.slots {
			llama.Free(sl.ctx)
		}
		llama.ModelFree(s.model)
		s.ready.Store(false)
	}
	return err
}

// acquire takes slot want (-1: any) as soon as it is idle; llama-server
// too defers a request while the slot it needs is busy. Of the idle slots,
// any request takes the one whose cache shares the longest prefix with
// its tokens, the least recently used when none shares any: other
// sessions' caches live on as long as they can.
func (s *Server) acquire(ctx context.Context, want int, tokens []llama.Token) (*slot, error) {
	counted := false
	for {
		s.slotMu.Lock()
		sl := s.pick(want, tokens)
		if sl != nil {
			sl.busy.Store(true)
		}
		released := s.released
		s.slotMu.Unlock()
		if sl != nil {
			return sl, nil
		}
		if !counted {
			counted = true
			s.deferred.Add(1)
			defer s.deferred.Add(-1)
		}
		select {
		case <-released:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
}

// pick is the idle slot acquire takes, or nil; slotMu is held.
func (s *Server) pick(want int, tokens []llama.Token) *slot {
	if want >= 0 {
		if sl := s.slots[want]; !sl.busy.Load() {
			return sl
		}
		return nil
	}
	var best *slot
	bestPrefix := 0
	for _, sl := range s.slots {
		if sl.busy.Load() {
			continue
		}
		n := commonPrefix(sl.cached, tokens)
		if best == nil || n > bestPrefix || (n == bestPrefix && sl.lastUsed < best.lastUsed) {
			best, bestPrefix = sl, n
		}
	}
	return best
}

func (s *Server) release(sl *slot) {
	sl.taskID.Store(-1)
	s.slotMu.Lock()
	s.uses++
	sl.lastUsed = s.uses
	sl.busy.Store(false)
	close(s.released)
	s.released = make(chan struct{})
	s.slotMu.Unlock()
}

// tokens is the prompt as token ids, checked against the vocabulary and
// the slots' context: a request that cannot run fails before it waits.
func (s *Server) tokens(in promptInput) ([]llama.Token, error) {
	tokens := in.Tokens
	if tokens == nil {
		tokens = llama.Tokenize(s.vocab, in.Text, true, true)
	}
	nVocab := llama.VocabNTokens(s.vocab)
	for _, t := range tokens {
		if t < 0 || int32(t) >= nVocab {
			return nil, &requestError{fmt.Sprintf("the prompt has token %d, outside the vocabulary (0-%d)", t, nVocab-1)}
		}
	}
	if len(tokens) == 0 {
		return nil, &requestError{"the prompt is empty"}
	}
	if len(tokens) >= s.slotCtx {
		return nil, &requestError{fmt.Sprintf("the request exceeds the available context size (%d tokens), try increasing it: the prompt has %d tokens", s.slotCtx, len(tokens))}
	}
	return tokens, nil
}

// hold takes a slot as acquire does and counts the request processing
// until done gives the slot back.
func (s *Server) hold(ctx context.Context, want int, tokens []llama.Token) (sl *slot, done func(), err error) {
	if sl, err = s.acquire(ctx, want, tokens); err != nil {
		return nil, nil, err
	}
	s.processing.Add(1)
	return sl, func() {
		s.processing.Add(-1)
		s.release(sl)
	}, nil
}

// run takes a slot and generates, keeping the metrics.
func (s *Server) run(ctx context.Context, prompt promptInput, p sampling, emit emitFunc) (outcome, error) {
	toks, err := s.tokens(prompt)
	if err != nil {
		return outcome{}, err
	}
	prompt.Tokens = toks
	if prompt.Slot >= len(s.slots) {
		return outcome{}, &requestError{fmt.Sprintf("\"id_slot\" %d does not exist: the engine has %d slots (0-%d)", prompt.Slot, len(s.slots), len(s.slots)-1)}
	}
	sl, done, err := s.hold(ctx, prompt.Slot, toks)
	if err != nil {
		return outcome{}, err
	}
	defer done()
	sl.taskID.Store(s.nextTask.Add(1))
	out, err := sl.generate(ctx, prompt, p, emit)
	out.Slot, out.Held = sl.id, len(sl.cached)
	s.tokensPredicted.Add(int64(out.Predicted))
	s.promptTokens.Add(int64(out.Evaluated - out.Cached))
	s.promptMicros.Add(int64(out.PromptMs * 1000))
	s.predictedMicros.Add(int64(out.PredictedMs * 1000))
	if err == nil {
		s.requestsFinished.Add(1)
		s.log.Debug("completion", "slot", sl.id, "prompt_tokens", out.Evaluated, "cached", out.Cached, "predicted", out.Predicted,
			"stop_type", out.StopType, "predicted_per_second", perSecond(out.Predicted, out.PredictedMs))
	}
	return out, err
}

func perSecond(n int, ms float64) float64 {
	if ms <= 0 {
		return 0
	}
	return float64(n) * 1000 / ms
}

// writeSSE writes one `data: ` event and flushes it; the error says the
// client is gone.
func writeSSE(w http.ResponseWriter, v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return err
	}
	if _, err := fmt.Fprintf(w, "data: %s\n\n", b); err != nil {
		return err
	}
	return http.NewResponseController(w).Flush()
}
