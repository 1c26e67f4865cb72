package vmm

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"testing"

	"github.com/goccy/go-yaml"

	"github.com/virtkit/virtkit/cmd/cmdtest"
)

// openAPI is a small validator for the subset of OpenAPI 3 schema that Cloud Hypervisor's spec uses:
// $ref, type, required, properties, items, enum, minimum. It is stricter than CH in one way on
// purpose: a property the spec does not know is an error, so a typo in the driver cannot hide.
type openAPI struct {
	doc map[string]any
}

func cmdtestRoot(t testing.TB) string { return cmdtest.Root(t) }

func yamlUnmarshal(b []byte, v any) error { return yaml.Unmarshal(b, v) }

func loadOpenAPI(t testing.TB) *openAPI {
	t.Helper()
	p := filepath.Join(cmdtest.Root(t), "..", "shared", "cloud-hypervisor", "cloud-hypervisor.yaml")
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatalf("Cloud Hypervisor's OpenAPI spec: %v", err)
	}
	var doc map[string]any
	if err := yamlUnmarshal(b, &doc); err != nil {
		t.Fatalf("parse %s: %v", p, err)
	}
	return &openAPI{doc: doc}
}

func (o *openAPI) schema(name string) map[string]any {
	comps, _ := o.doc["components"].(map[string]any)
	schemas, _ := comps["schemas"].(map[string]any)
	s, _ := schemas[name].(map[string]any)
	return s
}

// requestSchema returns the schema name of an endpoint's PUT body, or "" when it takes none.
func (o *openAPI) requestSchema(endpoint string) (string, bool) {
	paths, _ := o.doc["paths"].(map[string]any)
	p, ok := paths["/"+endpoint].(map[string]any)
	if !ok {
		return "", false
	}
	for _, m := range []string{"put", "get"} {
		op, ok := p[m].(map[string]any)
		if !ok {
			continue
		}
		rb, ok := op["requestBody"].(map[string]any)
		if !ok {
			return "", true
		}
		ref := rb["content"].(map[string]any)["application/json"].(map[string]any)["schema"].(map[string]any)["$ref"].(string)
		return strings.TrimPrefix(ref, "#/components/schemas/"), true
	}
	return "", true
}

func (o *openAPI) validate(v any, s map[string]any, path string) []string {
	if ref, ok := s["$ref"].(string); ok {
		return o.validate(v, o.schema(strings.TrimPrefix(ref, "#/components/schemas/")), path)
	}
	var errs []string
	bad := func(f string, a ...any) { errs = append(errs, path+": "+fmt.Sprintf(f, a...)) }
	if enum, ok := s["enum"].([]any); ok {
		found := false
		for _, e := range enum {
			if fmt.Sprint(e) == fmt.Sprint(v) {
				found = true
			}
		}
		if !found {
			bad("%v not in %v", v, enum)
		}
	}
	switch s["type"] {
	case "object":
		m, ok := v.(map[string]any)
		if !ok {
			bad("want object, got %T", v)
			return errs
		}
		req, _ := s["required"].([]any)
		for _, r := range req {
			if _, ok := m[r.(string)]; !ok {
				bad("missing required %q", r)
			}
		}
		props, _ := s["properties"].(map[string]any)
		keys := make([]string, 0, len(m))
		for k := range m {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		for _, k := range keys {
			ps, ok := props[k].(map[string]any)
			if !ok {
				if ap, ok := s["additionalProperties"].(map[string]any); ok {
					errs = append(errs, o.validate(m[k], ap, path+"."+k)...)
					continue
				}
				bad("unknown property %q", k)
				continue
			}
			errs = append(errs, o.validate(m[k], ps, path+"."+k)...)
		}
	case "array":
		a, ok := v.([]any)
		if !ok {
			bad("want array, got %T", v)
			return errs
		}
		items, _ := s["items"].(map[string]any)
		for i, e := range a {
			errs = append(errs, o.validate(e, items, fmt.Sprintf("%s[%d]", path, i))...)
		}
	case "string":
		if _, ok := v.(string); !ok {
			bad("want string, got %T", v)
		}
	case "boolean":
		if _, ok := v.(bool); !ok {
			bad("want boolean, got %T", v)
		}
	case "integer":
		f, ok := v.(float64)
		if !ok || f != float64(int64(f)) {
			bad("want integer, got %v", v)
			return errs
		}
		if min, ok := s["minimum"]; ok {
			if mf, ok := toFloat(min); ok && f < mf {
				bad("%v below minimum %v", f, mf)
			}
		}
	}
	return errs
}

func toFloat(v any) (float64, bool) {
	switch n := v.(type) {
	case uint64:
		return float64(n), true
	case int64:
		return float64(n), true
	case int:
		return float64(n), true
	case float64:
		return n, true
	}
	return 0, false
}

// validateBody checks a request body for endpoint against the spec.
func (o *openAPI) validateBody(endpoint string, body []byte) []string {
	name, ok := o.requestSchema(endpoint)
	if !ok {
		return []string{"endpoint /" + endpoint + " is not in Cloud Hypervisor's API"}
	}
	if name == "" {
		if len(body) != 0 {
			return []string{"/" + endpoint + " takes no body"}
		}
		return nil
	}
	var v any
	if err := json.Unmarshal(body, &v); err != nil {
		return []string{"body is not JSON: " + err.Error()}
	}
	return o.validate(v, o.schema(name), name)
}

func TestOpenAPIValidatorCatchesMistakes(t *testing.T) {
	o := loadOpenAPI(t)
	for _, tc := range []struct{ body, want string }{
		{`{"cpus":{"boot_vcpus":1,"max_vcpus":1}}`, `missing required "payload"`},
		{`{"payload":{"kernel":"k"},"memory":{"size":"1G"}}`, `want integer`},
		{`{"payload":{"kernel":"k"},"vsock":{"cid":2,"socket":"s"}}`, `below minimum`},
		{`{"payload":{"kernel":"k"},"serial":{"mode":"file"}}`, `not in`},
		{`{"payload":{"kernel":"k"},"disks":[{"path":"p","read_only":true}]}`, `unknown property "read_only"`},
	} {
		errs := o.validateBody("vm.create", []byte(tc.body))
		if !strings.Contains(strings.Join(errs, "\n"), tc.want) {
			t.Errorf("%s: got %v, want an error containing %q", tc.body, errs, tc.want)
		}
	}
}
