package codec

import (
	"context"
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"encoding/base64"
	"errors"
	"fmt"
	"strings"

	commonpb "go.temporal.io/api/common/v1"
	"go.temporal.io/api/proxy"
	"go.temporal.io/sdk/converter"
	"google.golang.org/protobuf/proto"
)

// Payload metadata of an encrypted payload (samples-go's conventions, which
// the Temporal UI and other codec servers know).
const (
	MetadataEncodingEncrypted = "binary/encrypted"
	MetadataEncryptionKeyID   = "encryption-key-id"
)

// Where keys come from: LLORCH_CODEC_KEYS holds them, or
// LLORCH_CODEC_KEYS_FILE names a file that does (never both). The format
// is `id1:base64key,id2:base64key` (commas or newlines between keys); each
// key is 32 bytes (AES-256); the first one encrypts, all decrypt.
const (
	EnvKeys = "LLORCH_CODEC_KEYS"
)

// KeySize is the size of an AES-256 key.
const KeySize = 32

// Codec is a converter.PayloadCodec encrypting with AES-256-GCM.
type Codec struct {
	current string
	ids     []string // in the order given, current first
	aeads   map[string]cipher.AEAD
}

var _ converter.PayloadCodec = (*Codec)(nil)

// ErrUnknownKey is the failure to decode a payload under a key id the codec
// does not hold.
var ErrUnknownKey = errors.New("unknown encryption key id")

// Parse reads a key list: `id:base64key` entries separated by commas or
// newlines, the first one the encrypting key.
func Parse(spec string) (*Codec, error) {
	c := &Codec{aeads: map[string]cipher.AEAD{}}
	for _, ent := range strings.FieldsFunc(spec, func(r rune) bool { return r == ',' || r == '\n' || r == '\r' }) {
		ent = strings.TrimSpace(ent)
		if ent == "" || strings.HasPrefix(ent, "#") {
			continue
		}
		id, b64, ok := strings.Cut(ent, ":")
		id, b64 = strings.TrimSpace(id), strings.TrimSpace(b64)
		if !ok || id == "" {
			return nil, fmt.Errorf("codec key %q: want id:base64key", redact(ent))
		}
		if strings.ContainsAny(id, " \t:") {
			return nil, fmt.Errorf("codec key id %q: no spaces or colons", id)
		}
		if _, dup := c.aeads[id]; dup {
			return nil, fmt.Errorf("codec key id %q given twice", id)
		}
		key, err := base64.StdEncoding.DecodeString(b64)
		if err != nil {
			return nil, fmt.Errorf("codec key %q: not base64: %w", id, err)
		}
		if len(key) != KeySize {
			return nil, fmt.Errorf("codec key %q: %d bytes, want %d (AES-256)", id, len(key), KeySize)
		}
		block, err := aes.NewCipher(key)
		if err != nil {
			return nil, fmt.Errorf("codec key %q: %w", id, err)
		}
		aead, err := cipher.NewGCM(block)
		if err != nil {
			return nil, fmt.Errorf("codec key %q: %w", id, err)
		}
		c.aeads[id] = aead
		c.ids = append(c.ids, id)
	}
	if len(c.ids) == 0 {
		return nil, errors.New("no codec key given")
	}
	c.current = c.ids[0]
	return c, nil
}

// redact keeps a key's id and drops its secret from an error message.
func redact(ent string) string {
	if id, _, ok := strings.Cut(ent, ":"); ok {
		return id + ":…"
	}
	if len(ent) > 8 {
		return ent[:4] + "…"
	}
	return ent
}

// NewKey is a fresh `id:base64key` entry (what `llorch dev` puts in its
// dev.env).
func NewKey(id string) string {
	k := make([]byte, KeySize)
	_, _ = rand.Read(k)
	return id + ":" + base64.StdEncoding.EncodeToString(k)
}

// KeyID is the id of the key that encrypts.
func (c *Codec) KeyID() string { return c.current }

// KeyIDs are the ids of every key the codec decrypts with, the encrypting
// one first.
func (c *Codec) KeyIDs() []string { return append([]string(nil), c.ids...) }

// Encode encrypts each payload, metadata and all, under the current key.
// The key id is bound to the ciphertext (GCM's additional data), so a
// payload relabeled with another id fails to decrypt.
func (c *Codec) Encode(payloads []*commonpb.Payload) ([]*commonpb.Payload, error) {
	aead := c.aeads[c.current]
	out := make([]*commonpb.Payload, len(payloads))
	for i, p := range payloads {
		plain, err := proto.Marshal(p)
		if err != nil {
			return payloads, fmt.Errorf("codec: marshal payload: %w", err)
		}
		nonce := make([]byte, aead.NonceSize(), aead.NonceSize()+len(plain)+aead.Overhead())
		if _, err := rand.Read(nonce); err != nil {
			return payloads, fmt.Errorf("codec: nonce: %w", err)
		}
		out[i] = &commonpb.Payload{
			Metadata: map[string][]byte{
				converter.MetadataEncoding: []byte(MetadataEncodingEncrypted),
				MetadataEncryptionKeyID:    []byte(c.current),
			},
			Data: aead.Seal(nonce, nonce, plain, []byte(c.current)),
		}
	}
	return out, nil
}

// Decode decrypts each encrypted payload and passes any other through
// (histories recorded before the codec, search attributes).
func (c *Codec) Decode(payloads []*commonpb.Payload) ([]*commonpb.Payload, error) {
	out := make([]*commonpb.Payload, len(payloads))
	for i, p := range payloads {
		if string(p.GetMetadata()[converter.MetadataEncoding]) != MetadataEncodingEncrypted {
			out[i] = p
			continue
		}
		id := string(p.GetMetadata()[MetadataEncryptionKeyID])
		aead, ok := c.aeads[id]
		if !ok {
			return payloads, fmt.Errorf("codec: payload encrypted with key id %q, which this process does not hold (it has %s; add the key to %s): %w",
				id, strings.Join(c.ids, ", "), EnvKeys, ErrUnknownKey)
		}
		data := p.GetData()
		if len(data) < aead.NonceSize()+aead.Overhead() {
			return payloads, fmt.Errorf("codec: payload under key id %q is truncated (%d bytes)", id, len(data))
		}
		plain, err := aead.Open(nil, data[:aead.NonceSize()], data[aead.NonceSize():], []byte(id))
		if err != nil {
			return payloads, fmt.Errorf("codec: payload under key id %q does not decrypt (wrong key for that id, or tampered): %w", id, err)
		}
		var dec commonpb.Payload
		if err := proto.Unmarshal(plain, &dec); err != nil {
			return payloads, fmt.Errorf("codec: payload under key id %q: %w", id, err)
		}
		out[i] = &dec
	}
	return out, nil
}

// DataConverter is the SDK's default converter with c in front of it; the
// default alone when c is nil (no keys: plaintext, as before the codec).
func DataConverter(c *Codec) converter.DataConverter {
	if c == nil {
		return converter.GetDefaultDataConverter()
	}
	return converter.NewCodecDataConverter(converter.GetDefaultDataConverter(), c)
}

// EncodeMessage encrypts every payload inside msg (a history, a request)
// but its search attributes, which the server must read.
func (c *Codec) EncodeMessage(ctx context.Context, msg proto.Message) error {
	return proxy.VisitPayloads(ctx, msg, proxy.VisitPayloadsOptions{SkipSearchAttributes: true,
		Visitor: func(_ *proxy.VisitPayloadsContext, p []*commonpb.Payload) ([]*commonpb.Payload, error) {
			return c.Encode(p)
		}})
}

// DecodeMessage decrypts every payload inside msg (a history fetched raw,
// to record it in plaintext or to read it).
func (c *Codec) DecodeMessage(ctx context.Context, msg proto.Message) error {
	return proxy.VisitPayloads(ctx, msg, proxy.VisitPayloadsOptions{SkipSearchAttributes: true,
		Visitor: func(_ *proxy.VisitPayloadsContext, p []*commonpb.Payload) ([]*commonpb.Payload, error) {
			return c.Decode(p)
		}})
}
