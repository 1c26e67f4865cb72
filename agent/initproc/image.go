package initproc

import (
	"encoding/json"
	"fmt"
	"slices"
)

// Image is the captured OCI image configuration the converter stores at /.virtkit/image.json.
type Image struct {
	Entrypoint []string `json:"entrypoint"`
	Cmd        []string `json:"cmd"`
	Env        []string `json:"env"`
	WorkingDir string   `json:"workdir"`
	User       string   `json:"user"`
}

// ParseImage decodes an image config. Unknown fields are ignored (the converter may store more).
func ParseImage(b []byte) (Image, error) {
	var im Image
	if err := json.Unmarshal(b, &im); err != nil {
		return Image{}, fmt.Errorf("initproc: image config: %w", err)
	}
	return im, nil
}

// Argv is the command the image runs: entrypoint followed by cmd, as Docker does.
func (im Image) Argv() []string {
	return append(slices.Clone(im.Entrypoint), im.Cmd...)
}
