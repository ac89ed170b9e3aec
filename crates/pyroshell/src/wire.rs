//! Bounded JSON decoding of request bodies.
//!
//! serde's derived `Deserialize` accepts a JSON array wherever a struct is
//! expected and grows vectors as long as the input goes on; a 32 MiB body of
//! millions of tiny entries would cost hundreds of MB before any check ran.
//! The helpers here make the wire follow the OpenAPI document instead:
//! objects only where the schema says object, integers also written as
//! integral numbers (`64.0`, `1e3`, which JSON Schema's `integer` admits),
//! and arrays and strings refused as soon as they pass their limit, while
//! the parse is still streaming, so the memory a body can cost is bounded
//! by its size, not by its shape.

use std::fmt;
use std::marker::PhantomData;

use serde::de::value::MapAccessDeserializer;
use serde::de::{self, DeserializeOwned, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;

use crate::api::FileBody;
use crate::error::ApiError;

/// Marks an error message as a limit refusal (422 with a code), not a syntax error (400).
/// The NUL keeps it from ever appearing in serde's own messages.
const LIMIT_MARK: &str = "\0limit:";

/// A limit refusal, carried through serde's error as text and recognised by [`parse`].
fn limit_error<E: de::Error>(code: &'static str, message: String) -> E {
    E::custom(format!("{LIMIT_MARK}{code}:{message}"))
}

/// Parses a request body into `T` with the rules above.
///
/// # Errors
/// [`ApiError::Malformed`] (400) for syntax, type or unknown-field errors and
/// a body that is not a JSON object; [`ApiError::Invalid`] (422,
/// `too_many_files` or `bad_args`, naming the field) for a count or size
/// over its limit.
pub fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let parsed = Object::<T>::deserialize(&mut de).and_then(|v| de.end().map(|()| v.0));
    parsed.map_err(|e| {
        let text = e.to_string();
        if let Some(rest) = text.split_once(LIMIT_MARK).map(|(_, r)| r) {
            // serde_json appends " at line L column C"; the limit's own message is enough.
            let rest = rest.rsplit_once(" at line ").map_or(rest, |(m, _)| m);
            let (code, message) = rest.split_once(':').unwrap_or(("bad_request", rest));
            let (code, field) = match code {
                "too_many_files" => ("too_many_files", "files"),
                _ => ("bad_args", "args"),
            };
            return ApiError::invalid(code, message, field);
        }
        ApiError::Malformed { message: format!("request body is not a valid request: {text}") }
    })
}

/// `T` that must be written as a JSON object (serde's derive also takes arrays).
struct Object<T>(T);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Object<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for V<T> {
            type Value = T;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
                T::deserialize(MapAccessDeserializer::new(map))
            }
        }
        d.deserialize_map(V(PhantomData)).map(Object)
    }
}

/// `deserialize_with` for struct-typed fields: objects only.
pub(crate) fn object<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<T, D::Error> {
    Object::<T>::deserialize(d).map(|o| o.0)
}

/// A non-negative integer, also written as an integral number (`64.0`, `1e3`).
struct Integral(u64);

impl<'de> Deserialize<'de> for Integral {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Integral;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a non-negative integer")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Integral, E> {
                Ok(Integral(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Integral, E> {
                u64::try_from(v).map(Integral).map_err(|_| E::invalid_value(de::Unexpected::Signed(v), &self))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Integral, E> {
                // 2^64 is exactly representable; anything at or above it does not fit.
                if v.fract() == 0.0 && (0.0..18_446_744_073_709_551_616.0).contains(&v) {
                    Ok(Integral(v as u64))
                } else {
                    Err(E::invalid_value(de::Unexpected::Float(v), &self))
                }
            }
        }
        d.deserialize_any(V)
    }
}

/// `deserialize_with` for optional integer fields.
pub(crate) fn opt_integral<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    Option::<Integral>::deserialize(d).map(|o| o.map(|i| i.0))
}

/// `deserialize_with` for `files`: objects, at most [`pyrovm::MAX_FILES`], refused at the first one too many.
pub(crate) fn files<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<FileBody>, D::Error> {
    struct V;
    impl<'de> Visitor<'de> for V {
        type Value = Vec<FileBody>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("an array of file objects")
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            let mut out = Vec::new();
            while let Some(Object(f)) = seq.next_element::<Object<FileBody>>()? {
                if out.len() == pyrovm::MAX_FILES {
                    return Err(limit_error(
                        "too_many_files",
                        format!("more than {} files submitted; at most {} are allowed", out.len(), pyrovm::MAX_FILES),
                    ));
                }
                out.push(f);
            }
            Ok(out)
        }
    }
    d.deserialize_seq(V)
}

/// One argument, refused before it is copied when it is too long.
struct Arg(String);

impl<'de> Deserialize<'de> for Arg {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Arg;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Arg, E> {
                if v.len() > pyrovm::MAX_ARG_BYTES {
                    return Err(limit_error(
                        "bad_args",
                        format!("an argument is {} bytes; at most {} are allowed", v.len(), pyrovm::MAX_ARG_BYTES),
                    ));
                }
                Ok(Arg(v.to_string()))
            }
        }
        d.deserialize_str(V)
    }
}

/// `deserialize_with` for `args`: at most [`pyrovm::MAX_ARGS`] strings of at most [`pyrovm::MAX_ARG_BYTES`].
pub(crate) fn args<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    struct V;
    impl<'de> Visitor<'de> for V {
        type Value = Vec<String>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("an array of strings")
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            let mut out = Vec::new();
            while let Some(Arg(a)) = seq.next_element::<Arg>()? {
                if out.len() == pyrovm::MAX_ARGS {
                    return Err(limit_error(
                        "bad_args",
                        format!("more than {} arguments given; at most {} are allowed", out.len(), pyrovm::MAX_ARGS),
                    ));
                }
                out.push(a);
            }
            Ok(out)
        }
    }
    d.deserialize_seq(V)
}
