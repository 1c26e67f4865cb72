package initproc

import (
	"encoding/json"
	"fmt"
	"slices"
	"strings"
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

// With returns the config with command (if any) replacing entrypoint + cmd and env entries added,
// replacing the image's entries of the same name in place.
func (im Image) With(command, env []string) Image {
	if len(command) > 0 {
		im.Entrypoint, im.Cmd = slices.Clone(command), nil
	}
	if len(env) == 0 {
		return im
	}
	out := slices.Clone(im.Env)
	for _, kv := range env {
		k, _, _ := strings.Cut(kv, "=")
		i := slices.IndexFunc(out, func(e string) bool { return strings.HasPrefix(e, k+"=") })
		if i >= 0 {
			out[i] = kv
		} else {
			out = append(out, kv)
		}
	}
	im.Env = out
	return im
}
