package main

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"time"

	"github.com/schollz/progressbar/v3"
	"github.com/spf13/cobra"
	"golang.org/x/term"

	"github.com/llorch/llorch/apiclient"
	"github.com/llorch/llorch/config"
	"github.com/llorch/llorch/model"
	"github.com/llorch/llorch/modelstore"
)

func modelsPushCmd() *cobra.Command {
	var (
		f          apiFlags
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
			ctx, stop := apiContext(cmd, 0)
			defer stop()
			p := modelPusher{out: cmd.OutOrStdout(), errOut: cmd.ErrOrStderr(), api: api, s3: f.s3,
				id: id, key: key, replace: replace, regTimeout: regTimeout}
			return apiHint(p.push(ctx, args[0]))
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
	api         *apiclient.Client
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
	gctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	existing, found, err := p.api.Model(gctx, p.id)
	cancel()
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
	req := apiclient.RegisterRequest{ID: p.id, Key: p.key, SHA256: sha, Size: size, Replace: p.replace}
	if uploadKey != p.key {
		req.SourceKey = uploadKey
	}
	e, err := p.api.RegisterModel(rctx, req)
	if err != nil {
		where := fmt.Sprintf("s3://%s/%s", store.Bucket, uploadKey)
		var ae *apiclient.Error
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
	list, err := p.api.ListModels(ctx)
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
