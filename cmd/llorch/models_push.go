package main

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/schollz/progressbar/v3"
	"github.com/spf13/cobra"
	"github.com/spf13/pflag"
	"golang.org/x/term"

	"github.com/llorch/llorch/config"
	"github.com/llorch/llorch/model"
	"github.com/llorch/llorch/modelstore"
)

// modelsFlags are the flags the `llorch models` commands share. With a
// `llorch dev` cluster running, its dev.env supplies all of them.
type modelsFlags struct {
	home     string
	apiURL   string
	apiToken string
	s3       config.S3
}

func (f *modelsFlags) add(fs *pflag.FlagSet, withS3 bool) {
	config.AddHomeFlag(fs, &f.home, homeUsage)
	fs.StringVar(&f.apiURL, "api-url", "http://127.0.0.1:8080", "URL of the llorch apiserver")
	fs.StringVar(&f.apiToken, "api-token", "", "bearer token of the llorch apiserver")
	if withS3 {
		config.AddS3Flags(fs, &f.s3)
	}
}

// client applies env and dev.env defaults and returns the API client.
func (f *modelsFlags) client(cmd *cobra.Command) (*catalogAPI, error) {
	if err := config.Apply(cmd.Flags(), f.home); err != nil {
		return nil, err
	}
	u, err := url.Parse(strings.TrimRight(f.apiURL, "/"))
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return nil, fmt.Errorf("--api-url %q: want http://host:port or https://host:port", f.apiURL)
	}
	return &catalogAPI{base: u.String(), token: f.apiToken, hc: &http.Client{}}, nil
}

// modelsSignalContext cancels on Ctrl-C or SIGTERM, so an upload stops and cleans up.
func modelsSignalContext(cmd *cobra.Command) (context.Context, context.CancelFunc) {
	ctx := cmd.Context()
	if ctx == nil {
		ctx = context.Background()
	}
	return signal.NotifyContext(ctx, os.Interrupt, syscall.SIGTERM)
}

func modelsPushCmd() *cobra.Command {
	var (
		f          modelsFlags
		id, key    string
		replace    bool
		regTimeout time.Duration
	)
	cmd := &cobra.Command{
		Use:   "push FILE --id ID [--key KEY] [--replace]",
		Short: "upload a GGUF model to the bucket and register it in the catalog",
		Long: "Hashes FILE, uploads it to the models bucket (default key models/ID.gguf) while hashing it\n" +
			"again, and registers it with the apiserver, which checks the object's sha256 and reads its\n" +
			"GGUF metadata. Pushing the same content again does nothing; different content under a\n" +
			"registered id needs --replace. With `llorch dev` running no other flag is needed.",
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			api, err := f.client(cmd)
			if err != nil {
				return err
			}
			if id == "" {
				return errors.New("--id is required")
			}
			if err := model.ValidateID(id); err != nil {
				return fmt.Errorf("--id: %w", err)
			}
			if key == "" {
				key = model.DefaultKey(id)
			}
			if err := model.ValidateKey(key); err != nil {
				return fmt.Errorf("--key: %w", err)
			}
			ctx, stop := modelsSignalContext(cmd)
			defer stop()
			p := modelPusher{out: cmd.OutOrStdout(), errOut: cmd.ErrOrStderr(), api: api, s3: f.s3,
				id: id, key: key, replace: replace, regTimeout: regTimeout}
			return p.push(ctx, args[0])
		},
	}
	f.add(cmd.Flags(), true)
	cmd.Flags().StringVar(&id, "id", "", "model id (a-z, 0-9, '.', '_', '-'), e.g. llama-3-8b-q4")
	cmd.Flags().StringVar(&key, "key", "", "object key in the bucket (default models/ID.gguf)")
	cmd.Flags().BoolVar(&replace, "replace", false, "replace a registered model whose content differs")
	cmd.Flags().DurationVar(&regTimeout, "register-timeout", 30*time.Minute,
		"how long to wait for the apiserver to verify and register the upload (it hashes the whole object)")
	config.BindEnv(cmd.Flags(), nil, "id", "key", "replace", "register-timeout")
	return cmd
}

type modelPusher struct {
	out, errOut io.Writer
	api         *catalogAPI
	s3          config.S3
	id, key     string
	replace     bool
	regTimeout  time.Duration
}

func (p *modelPusher) push(ctx context.Context, file string) error {
	fi, err := os.Stat(file)
	if err != nil {
		return err
	}
	if !fi.Mode().IsRegular() {
		return fmt.Errorf("%s is not a regular file", file)
	}
	// Ask the catalog before the (long, for a big model) local hash so a
	// wrong URL or token fails at once; then the digest says whether the
	// catalog already holds this content.
	existing, found, err := p.api.getModel(ctx, p.id)
	if err != nil {
		return err
	}
	// The upload writes the object before the apiserver sees the request:
	// refuse a key that holds another model's object rather than overwrite it.
	if err := p.checkKeyFree(ctx); err != nil {
		return err
	}
	sha, size, err := p.hashFile(ctx, file)
	if err != nil {
		return err
	}
	if found {
		if existing.SHA256 == sha {
			fmt.Fprintf(p.out, "model %s already registered with identical content (sha256 %s): nothing to do\n", p.id, sha)
			return nil
		}
		if !p.replace {
			return fmt.Errorf("model %s is already registered with sha256 %s, but %s has sha256 %s: pass --replace to replace it",
				p.id, existing.SHA256, file, sha)
		}
	}

	store, err := modelstore.New(p.s3)
	if err != nil {
		return err
	}
	if err := store.EnsureBucket(ctx); err != nil {
		return err
	}
	// Replacing a model in place: upload beside it and let the apiserver
	// copy it over the old object only once it accepted the new content, so
	// a refused push never leaves the catalog naming changed bytes.
	uploadKey := p.key
	if found && existing.Key == p.key {
		uploadKey = "uploads/" + p.id + "-" + sha[:16] + ".gguf"
	}
	uploaded, err := p.upload(ctx, store, file, uploadKey, sha, size)
	if err != nil {
		return err
	}

	rctx, cancel := context.WithTimeout(ctx, p.regTimeout)
	defer cancel()
	req := modelRegisterRequest{ID: p.id, Key: p.key, SHA256: sha, Size: size, Replace: p.replace}
	if uploadKey != p.key {
		req.SourceKey = uploadKey
	}
	e, err := p.api.registerModel(rctx, req)
	if err != nil {
		where := fmt.Sprintf("s3://%s/%s", store.Bucket, uploadKey)
		var ae *catalogAPIError
		refused := errors.As(err, &ae) && ae.Status >= 400 && ae.Status < 500 // final: not GGUF, checksum, conflict
		switch {
		case refused && uploaded:
			// Remove what this push wrote.
			cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
			defer cancel()
			if rmErr := store.Remove(cctx, uploadKey); rmErr != nil {
				fmt.Fprintf(p.errOut, "registration refused; removing %s failed: %v\n", where, rmErr)
			} else {
				fmt.Fprintf(p.errOut, "registration refused: removed %s\n", where)
			}
		case !refused:
			fmt.Fprintf(p.errOut, "the file is uploaded to %s but not registered; the same push again registers it without uploading again\n", where)
		}
		return err
	}
	printCatalogEntry(p.out, "registered model "+e.ID, e, store.Bucket)
	return nil
}

func (p *modelPusher) checkKeyFree(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	_, list, err := p.api.listModels(ctx)
	if err != nil {
		return err
	}
	for _, e := range list.Models {
		if e.Key == p.key && e.ID != p.id {
			return fmt.Errorf("object key %s already belongs to model %s: choose another --key", p.key, e.ID)
		}
	}
	return nil
}

// upload sends file to the key unless an earlier push already did (same size
// and the sha256 recorded with the object: a push whose registration failed).
// The digest computed while sending must equal the pre-hash, or the file
// changed during the upload and the object is deleted.
func (p *modelPusher) upload(ctx context.Context, store *modelstore.Store, file, key, sha string, size int64) (uploaded bool, err error) {
	where := fmt.Sprintf("s3://%s/%s", store.Bucket, key)
	if info, err := store.Stat(ctx, key); err == nil && info.Size == size && info.UserMetadata["Sha256"] == sha {
		fmt.Fprintf(p.errOut, "%s already holds this content (size and recorded sha256 match): not uploading again\n", where)
		return false, nil
	} else if err != nil && !errors.Is(err, modelstore.ErrObjectMissing) {
		return false, err
	}
	fh, err := os.Open(file)
	if err != nil {
		return false, err
	}
	defer fh.Close()
	bar := p.bar(size, "uploading")
	start := time.Now()
	sent, err := store.Upload(ctx, fh, size, key, bar, modelstore.UserMetadata(map[string]string{"sha256": sha}))
	_ = bar.Finish()
	if err != nil {
		return false, err
	}
	took := time.Since(start)
	fmt.Fprintf(p.errOut, "uploaded %s (%s) to %s in %s (%.1f MB/s)\n",
		file, modelsBytes(size), where, took.Round(time.Millisecond), float64(size)/1e6/max(took.Seconds(), 1e-9))
	if sent != sha {
		cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
		defer cancel()
		rmErr := store.Remove(cctx, key)
		if rmErr != nil {
			return false, fmt.Errorf("%s changed during the upload (sha256 %s before, %s sent), and deleting %s failed: %v",
				file, sha, sent, where, rmErr)
		}
		return false, fmt.Errorf("%s changed during the upload (sha256 %s before, %s sent): deleted %s; push again once the file is stable",
			file, sha, sent, where)
	}
	return true, nil
}

func (p *modelPusher) hashFile(ctx context.Context, file string) (string, int64, error) {
	fh, err := os.Open(file)
	if err != nil {
		return "", 0, err
	}
	defer fh.Close()
	fi, err := fh.Stat()
	if err != nil {
		return "", 0, err
	}
	magic := make([]byte, 4)
	if _, err := io.ReadFull(fh, magic); err != nil || string(magic) != "GGUF" {
		return "", 0, fmt.Errorf("%s is not a GGUF model: it does not start with the GGUF magic", file)
	}
	if _, err := fh.Seek(0, io.SeekStart); err != nil {
		return "", 0, err
	}
	h := sha256.New()
	bar := p.bar(fi.Size(), "hashing  ")
	start := time.Now()
	n, err := io.Copy(io.MultiWriter(h, modelsQuietWriter{bar}), modelsCtxReader{ctx, fh})
	_ = bar.Finish()
	if err != nil {
		return "", 0, fmt.Errorf("hash %s: %w", file, err)
	}
	sha := hex.EncodeToString(h.Sum(nil))
	fmt.Fprintf(p.errOut, "sha256 %s (%s hashed in %s)\n", sha, modelsBytes(n), time.Since(start).Round(time.Millisecond))
	return sha, n, nil
}

// bar is a progressbar.DefaultBytes-style bar (bytes, rate, ETA) on stderr,
// shown only when stderr is a terminal.
func (p *modelPusher) bar(size int64, what string) *progressbar.ProgressBar {
	visible := size > 0 && modelsIsTerminal(p.errOut)
	return progressbar.NewOptions64(size,
		progressbar.OptionSetDescription(what),
		progressbar.OptionSetWriter(p.errOut),
		progressbar.OptionSetVisibility(visible),
		progressbar.OptionShowBytes(true),
		progressbar.OptionShowTotalBytes(true),
		progressbar.OptionSetWidth(10),
		progressbar.OptionThrottle(65*time.Millisecond),
		progressbar.OptionShowCount(),
		progressbar.OptionOnCompletion(func() {
			if visible {
				fmt.Fprint(p.errOut, "\n")
			}
		}),
		progressbar.OptionSpinnerType(14),
		progressbar.OptionFullWidth(),
		progressbar.OptionSetRenderBlankState(visible),
	)
}

func modelsIsTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	return ok && term.IsTerminal(int(f.Fd()))
}

// modelsQuietWriter keeps a progress display from failing the work it shows.
type modelsQuietWriter struct{ w io.Writer }

func (i modelsQuietWriter) Write(b []byte) (int, error) {
	_, _ = i.w.Write(b)
	return len(b), nil
}

// modelsCtxReader stops a long local read when ctx is cancelled (Ctrl-C).
type modelsCtxReader struct {
	ctx context.Context
	r   io.Reader
}

func (c modelsCtxReader) Read(b []byte) (int, error) {
	if err := c.ctx.Err(); err != nil {
		return 0, err
	}
	return c.r.Read(b)
}

func modelsLsCmd() *cobra.Command {
	var (
		f      modelsFlags
		asJSON bool
	)
	cmd := &cobra.Command{
		Use:   "ls [--json]",
		Short: "list the models in the catalog",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			api, err := f.client(cmd)
			if err != nil {
				return err
			}
			ctx, stop := modelsSignalContext(cmd)
			defer stop()
			ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
			defer cancel()
			raw, list, err := api.listModels(ctx)
			if err != nil {
				return err
			}
			if asJSON {
				raw = bytes.TrimRight(raw, "\n")
				_, err := fmt.Fprintf(cmd.OutOrStdout(), "%s\n", raw)
				return err
			}
			return printModelTable(cmd.OutOrStdout(), list.Models)
		},
	}
	f.add(cmd.Flags(), false)
	cmd.Flags().BoolVar(&asJSON, "json", false, "print the API's JSON instead of a table")
	config.BindEnv(cmd.Flags(), nil, "json")
	return cmd
}

func printModelTable(w io.Writer, models []model.Entry) error {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "ID\tLIFECYCLE\tSIZE\tSHA256\tARCH\tPARAMS\tCREATED")
	for _, e := range models {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\n", e.ID, modelsDash(string(e.Lifecycle)), modelsBytes(e.Size),
			modelsDash(e.SHA256[:min(12, len(e.SHA256))]), modelsDash(e.Metadata.Architecture),
			modelsParams(e.Metadata.Parameters), modelsTime(e.CreatedAt))
	}
	return tw.Flush()
}

func modelsRmCmd() *cobra.Command {
	var f modelsFlags
	cmd := &cobra.Command{
		Use:   "rm ID",
		Short: "remove a model from the catalog",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			id := args[0]
			if err := model.ValidateID(id); err != nil {
				return err
			}
			api, err := f.client(cmd)
			if err != nil {
				return err
			}
			ctx, stop := modelsSignalContext(cmd)
			defer stop()
			ctx, cancel := context.WithTimeout(ctx, 60*time.Second)
			defer cancel()
			if err := api.deleteModel(ctx, id); err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "removed model %s from the catalog\n", id)
			return nil
		},
	}
	f.add(cmd.Flags(), false)
	config.BindEnv(cmd.Flags(), nil)
	return cmd
}

// catalogAPI is the client of the apiserver's /v2/catalog/models endpoints.
type catalogAPI struct {
	base  string
	token string
	hc    *http.Client
}

// modelRegisterRequest is the body of POST /v2/catalog/models.
type modelRegisterRequest struct {
	ID      string `json:"id"`
	Key     string `json:"key"`
	SHA256  string `json:"sha256"`
	Size    int64  `json:"size"`
	Replace bool   `json:"replace"`
	// SourceKey is where the new content was uploaded when it replaces
	// a model in place; the apiserver copies it to Key once accepted.
	SourceKey string `json:"source_key,omitempty"`
}

// modelList is the body of GET /v2/catalog/models.
type modelList struct {
	Models []model.Entry `json:"models"`
	Count  int           `json:"count"`
}

// catalogAPIError is the apiserver's error envelope; main prints it as
// "llorch: <code>: <message>".
type catalogAPIError struct {
	Status  int    `json:"-"`
	Code    string `json:"code"`
	Message string `json:"message"`
	Field   string `json:"field,omitempty"`
}

func (e *catalogAPIError) Error() string {
	msg := e.Code + ": " + e.Message
	if e.Field != "" && !strings.Contains(e.Message, e.Field) {
		msg += " (field " + e.Field + ")"
	}
	return msg
}

func (a *catalogAPI) modelURL(id string) string {
	return a.base + "/v2/catalog/models/" + url.PathEscape(id)
}

// call sends a request and returns the status and body of a 2xx answer; any
// other answer is an *catalogAPIError (a non-envelope body becomes one with its
// HTTP status as the code).
func (a *catalogAPI) call(ctx context.Context, method, u string, body any) (int, []byte, error) {
	var rd io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			return 0, nil, err
		}
		rd = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, u, rd)
	if err != nil {
		return 0, nil, err
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	req.Header.Set("Accept", "application/json")
	if a.token != "" {
		req.Header.Set("Authorization", "Bearer "+a.token)
	}
	resp, err := a.hc.Do(req)
	if err != nil {
		if ctx.Err() != nil {
			return 0, nil, fmt.Errorf("%s %s: %w", method, u, context.Cause(ctx))
		}
		return 0, nil, fmt.Errorf("cannot reach the llorch apiserver at %s: %v (is it running? set --api-url or LLORCH_API_URL)", a.base, err)
	}
	defer resp.Body.Close()
	raw, err := io.ReadAll(io.LimitReader(resp.Body, 64<<20))
	if err != nil {
		return resp.StatusCode, nil, fmt.Errorf("%s %s: reading the answer: %w", method, u, err)
	}
	if resp.StatusCode >= 200 && resp.StatusCode < 300 {
		return resp.StatusCode, raw, nil
	}
	ae := &catalogAPIError{}
	if json.Unmarshal(raw, ae) != nil || ae.Code == "" {
		text := strings.TrimSpace(string(raw))
		if len(text) > 300 {
			text = text[:300] + "..."
		}
		if text == "" {
			text = http.StatusText(resp.StatusCode)
		}
		ae = &catalogAPIError{Code: "HTTP_" + strconv.Itoa(resp.StatusCode), Message: fmt.Sprintf("%s %s: %s", method, u, text)}
	}
	ae.Status = resp.StatusCode
	return resp.StatusCode, raw, ae
}

// getModel is GET /v2/catalog/models/{id}; a 404 is found == false.
func (a *catalogAPI) getModel(ctx context.Context, id string) (model.Entry, bool, error) {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	_, raw, err := a.call(ctx, http.MethodGet, a.modelURL(id), nil)
	var ae *catalogAPIError
	if errors.As(err, &ae) && ae.Status == http.StatusNotFound {
		return model.Entry{}, false, nil
	}
	if err != nil {
		return model.Entry{}, false, err
	}
	e, err := decodeCatalogEntry(raw)
	return e, err == nil, err
}

// registerModel is POST /v2/catalog/models; the answer is the entry.
func (a *catalogAPI) registerModel(ctx context.Context, r modelRegisterRequest) (model.Entry, error) {
	_, raw, err := a.call(ctx, http.MethodPost, a.base+"/v2/catalog/models", r)
	if err != nil {
		return model.Entry{}, err
	}
	return decodeCatalogEntry(raw)
}

// listModels is GET /v2/catalog/models.
func (a *catalogAPI) listModels(ctx context.Context) ([]byte, modelList, error) {
	_, raw, err := a.call(ctx, http.MethodGet, a.base+"/v2/catalog/models", nil)
	if err != nil {
		return nil, modelList{}, err
	}
	var l modelList
	if err := json.Unmarshal(raw, &l); err != nil {
		return nil, modelList{}, fmt.Errorf("GET %s/v2/catalog/models: unexpected answer: %w", a.base, err)
	}
	return raw, l, nil
}

// deleteModel is DELETE /v2/catalog/models/{id} (204).
func (a *catalogAPI) deleteModel(ctx context.Context, id string) error {
	_, _, err := a.call(ctx, http.MethodDelete, a.modelURL(id), nil)
	var ae *catalogAPIError
	if errors.As(err, &ae) && ae.Status == http.StatusNotFound {
		return fmt.Errorf("model %s not found", id)
	}
	return err
}

// decodeCatalogEntry reads an entry, bare or wrapped as {"model": {...}} or
// {"entry": {...}}.
func decodeCatalogEntry(raw []byte) (model.Entry, error) {
	var fields map[string]json.RawMessage
	if err := json.Unmarshal(raw, &fields); err != nil {
		return model.Entry{}, fmt.Errorf("unexpected answer from the apiserver (want a catalog entry): %w", err)
	}
	if _, ok := fields["id"]; !ok {
		for _, k := range []string{"model", "entry"} {
			if inner, ok := fields[k]; ok {
				raw = inner
				break
			}
		}
	}
	var e model.Entry
	if err := json.Unmarshal(raw, &e); err != nil || e.ID == "" {
		return model.Entry{}, fmt.Errorf("unexpected answer from the apiserver (want a catalog entry): %s", modelsTruncate(string(raw), 300))
	}
	return e, nil
}

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

func modelsTruncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "..."
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
