package model

import (
	"fmt"
	"path"
	"regexp"
	"strings"
	"time"

	"go.temporal.io/sdk/temporal"
)

// Workflow types and their readable ids (DESIGN.md decision 3).
const (
	StageWorkflowType = "Stage"
	GCWorkflowType    = "GC"
	// SignalStageProgress carries a Progress from the download activity, at
	// most every ProgressStepPercent, so the UI can show it.
	SignalStageProgress = "progress"
	QueryStageProgress  = "progress"
	ProgressStepPercent = 10
)

// DigestPrefixLen is how much of the sha256 a staging workflow id carries.
const DigestPrefixLen = 16

// StageWorkflowID is the one staging of a digest onto a node.
func StageWorkflowID(nodeID, sha256 string) string {
	return "stage:" + nodeID + ":" + sha256[:min(len(sha256), DigestPrefixLen)]
}

// GCWorkflowID is a node's garbage collection.
func GCWorkflowID(nodeID string) string { return "gc:" + nodeID }

// GCRunWorkflowID is the id of a GC run the API starts: a dry run has its
// own, so it never joins a real run.
func GCRunWorkflowID(nodeID string, dryRun bool) string {
	if dryRun {
		return GCWorkflowID(nodeID) + ":dry-run"
	}
	return GCWorkflowID(nodeID)
}

// ModelIDKey is the typed search attribute that finds a model's workflows.
var ModelIDKey = temporal.NewSearchAttributeKeyKeyword("ModelId")

// Application error types: non-retryable failures the API maps to codes.
const (
	ErrDiskFull         = "DISK_FULL"
	ErrChecksumMismatch = "CHECKSUM_MISMATCH"
	ErrObjectMissing    = "OBJECT_MISSING"
	ErrNotGGUF          = "NOT_GGUF"
	// ErrNotFound: a request for a model the catalog lacks.
	ErrNotFound = "MODEL_NOT_FOUND"
	// ErrRetired: a request for a model the catalog has retired.
	ErrRetired = "MODEL_RETIRED"
	// ErrInvalidStageInput: the entry cannot be staged as given (bad digest,
	// key or size); retrying cannot help.
	ErrInvalidStageInput = "INVALID_STAGE_INPUT"
	// ErrStagingBusy: another attempt on this node still writes the partial
	// (a timed-out attempt that has not noticed yet); retryable.
	ErrStagingBusy = "STAGING_BUSY"
	// ErrAttemptAbandoned: a restarted node fails the download attempt its
	// dead predecessor left started, so the retry starts at once.
	ErrAttemptAbandoned = "ATTEMPT_ABANDONED"
	// ErrInUse: an eviction refused because the model is open.
	ErrInUse = "IN_USE"
	// ErrInvalidEviction: an eviction names no file GC may delete.
	ErrInvalidEviction = "INVALID"
	// ErrStagingFailed and ErrStagingTimedOut describe a staging that ended
	// without a typed error (terminated, canceled, timed out).
	ErrStagingFailed   = "FAILED"
	ErrStagingTimedOut = "TIMEOUT"
)

// Lifecycle of a catalog entry.
type Lifecycle string

const (
	Active  Lifecycle = "Active"
	Retired Lifecycle = "Retired"
)

// ParseLifecycle accepts a lifecycle name in any case.
func ParseLifecycle(s string) (Lifecycle, error) {
	for _, l := range []Lifecycle{Active, Retired} {
		if strings.EqualFold(string(l), s) {
			return l, nil
		}
	}
	return "", fmt.Errorf("unknown state %q (want Active or Retired)", s)
}

// StageRequest asks for one model on one node: the staging workflow's input.
type StageRequest struct {
	NodeID string
	Entry  Entry
}

// Metadata is what the GGUF header says about a model.
type Metadata struct {
	Architecture  string `json:"architecture"`
	Name          string `json:"name,omitempty"`
	Parameters    uint64 `json:"parameters"`
	ContextLength uint64 `json:"context_length"`
	Quantization  string `json:"quantization"`
	Layers        uint64 `json:"layers"`
	// EstimatedVRAMBytes is what llama.cpp needs with every layer offloaded
	// at EstimateContext tokens of context.
	EstimateContext    uint64 `json:"estimate_context"`
	EstimatedVRAMBytes uint64 `json:"estimated_vram_bytes"`
	EstimatedRAMBytes  uint64 `json:"estimated_ram_bytes"`
}

// Entry is one model in the catalog.
type Entry struct {
	ID         string    `json:"id"`
	Key        string    `json:"key"`
	SHA256     string    `json:"sha256"`
	Size       int64     `json:"size"`
	Metadata   Metadata  `json:"metadata"`
	Lifecycle  Lifecycle `json:"lifecycle"`
	CreatedAt  time.Time `json:"created_at"`
	VerifiedAt time.Time `json:"verified_at"`
}

var (
	idPattern  = regexp.MustCompile(`^[a-z0-9]([a-z0-9._-]{0,126}[a-z0-9])?$`)
	keyPattern = regexp.MustCompile(`^[A-Za-z0-9._/-]{1,512}$`)
	shaPattern = regexp.MustCompile(`^[0-9a-f]{64}$`)
)

// ValidateID checks a model id (e.g. llama-3-8b-q4): it names files, workflow
// search attributes and URLs.
func ValidateID(id string) error {
	if !idPattern.MatchString(id) {
		return fmt.Errorf("model id %q is invalid: use 1-128 characters of a-z, 0-9, '.', '_' or '-', starting and ending with a letter or digit", id)
	}
	return nil
}

// ValidateKey checks an object key: relative, no traversal, bounded.
func ValidateKey(key string) error {
	switch {
	case !keyPattern.MatchString(key):
		return fmt.Errorf("object key %q is invalid: use 1-512 characters of A-Z, a-z, 0-9, '.', '_', '-' or '/'", key)
	case strings.HasPrefix(key, "/"):
		return fmt.Errorf("object key %q is absolute: keys are relative to the bucket", key)
	case path.Clean(key) != key || strings.Contains(key, ".."):
		return fmt.Errorf("object key %q is not clean (no '..', '//', './' or trailing '/')", key)
	case strings.HasPrefix(key, CatalogPrefix):
		return fmt.Errorf("object key %q is inside %s, which holds the catalog itself", key, CatalogPrefix)
	}
	return nil
}

// ValidateSHA256 checks a lower-case hex sha256.
func ValidateSHA256(s string) error {
	if !shaPattern.MatchString(s) {
		return fmt.Errorf("sha256 %q is not 64 lower-case hex digits", s)
	}
	return nil
}

// CatalogPrefix is where catalog entries live in the bucket: the catalog is
// durable where the models are, with no database on the control plane.
const CatalogPrefix = "catalog/"

// EntryKey is the object key of a catalog entry.
func EntryKey(id string) string { return CatalogPrefix + id + ".json" }

// DefaultKey is where `llorch models push` puts a model.
func DefaultKey(id string) string { return "models/" + id + ".gguf" }
