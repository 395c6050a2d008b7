// Package config turns flags, environment variables and the dev state dir into
// the settings of each llorch command. Every knob has one name across flag,
// env var and the README table; precedence is flag > env > dev state > default.
package config
