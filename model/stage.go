package model

// StageStatus is what the staging workflow's progress query returns.
type StageStatus struct {
	NodeID     string  `json:"node_id"`
	ModelID    string  `json:"model_id"`
	SHA256     string  `json:"sha256"`
	Phase      string  `json:"phase"` // downloading | ready
	BytesDone  int64   `json:"bytes_done"`
	BytesTotal int64   `json:"bytes_total"`
	Percent    int     `json:"percent"`
	Rate       float64 `json:"rate_bytes_per_sec"`
}

// StageResult is where the verified file is and what it took to get it:
// the result of the staging workflow and of its download activity.
type StageResult struct {
	Path   string
	SHA256 string
	Size   int64
	// BytesTransferred is what this attempt fetched from the object store:
	// Size minus what it resumed from, 0 when AlreadyPresent.
	BytesTransferred int64
	AlreadyPresent   bool
	// DurationMs runs from the first attempt's scheduling, so it includes
	// retries and their backoff.
	DurationMs int64
}

// StageProgressSignal is the payload of SignalStageProgress, sent at most
// once per ProgressStepPercent.
type StageProgressSignal struct {
	BytesDone       int64   `json:"bytes_done"`
	BytesTotal      int64   `json:"bytes_total"`
	Percent         int     `json:"percent"`
	RateBytesPerSec float64 `json:"rate_bytes_per_sec"`
}
