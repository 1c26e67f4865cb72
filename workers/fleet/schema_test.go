package fleet

import (
	"encoding/json"
	"os"
	"path/filepath"
	"reflect"
	"sort"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"

	"github.com/virtkit/virtkit/cmd/cmdtest"
)

// TestSchemaMatchesModel keeps docs/fleet.schema.json and the Go model in step: every YAML key the
// parser accepts is in the schema and the other way round.
func TestSchemaMatchesModel(t *testing.T) {
	b, err := os.ReadFile(filepath.Join(cmdtest.Root(t), "docs", "fleet.schema.json"))
	if err != nil {
		t.Fatal(err)
	}
	var s struct {
		Properties map[string]json.RawMessage `json:"properties"`
		Defs       struct {
			Unit struct {
				Properties map[string]struct {
					Items struct {
						Properties map[string]any `json:"properties"`
					} `json:"items"`
					Properties map[string]any `json:"properties"`
				} `json:"properties"`
			} `json:"unit"`
		} `json:"$defs"`
	}
	if err := json.Unmarshal(b, &s); err != nil {
		t.Fatal(err)
	}
	check := func(what string, typ reflect.Type, schemaKeys []string) {
		if d := cmp.Diff(yamlKeys(typ), sorted(schemaKeys)); d != "" {
			t.Errorf("%s: model vs schema keys (-model +schema):\n%s", what, d)
		}
	}
	check("file", reflect.TypeOf(File{}), keys(s.Properties))
	up := s.Defs.Unit.Properties
	check("unit", reflect.TypeOf(Unit{}), keys(up))
	check("share", reflect.TypeOf(Share{}), keys(up["shares"].Items.Properties))
	check("volume", reflect.TypeOf(Volume{}), keys(up["volumes"].Items.Properties))
	check("healthcheck", reflect.TypeOf(Health{}), keys(up["healthcheck"].Properties))
}

func yamlKeys(t reflect.Type) []string {
	var out []string
	for i := 0; i < t.NumField(); i++ {
		if k, _, _ := strings.Cut(t.Field(i).Tag.Get("yaml"), ","); k != "" && k != "-" {
			out = append(out, k)
		}
	}
	return sorted(out)
}

func keys[V any](m map[string]V) []string {
	var out []string
	for k := range m {
		out = append(out, k)
	}
	return sorted(out)
}

func sorted(s []string) []string { sort.Strings(s); return s }
