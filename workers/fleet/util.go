package fleet

import (
	"crypto/rand"
	"encoding/base64"
	"encoding/hex"
)

func nonce() string {
	b := make([]byte, 4)
	rand.Read(b)
	return hex.EncodeToString(b)
}

func b64(s string) string { return base64.StdEncoding.EncodeToString([]byte(s)) }
