package jobs

import (
	"crypto/rand"
	"encoding/hex"
)

func nonce() string {
	b := make([]byte, 5)
	rand.Read(b)
	return hex.EncodeToString(b)
}
