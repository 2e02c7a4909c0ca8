//! What a caught panic said, for logs and error messages: the one downcast of a panic
//! payload that the plug-in loaders, the HTTP layer's panic handler and the engine thread
//! share. Never a backtrace.

use std::any::Any;

/// The panic's message (`panic!` carries a `&str` or a `String`), or `"no message"`.
pub fn panic_message(panic: &(dyn Any + Send)) -> &str {
    if let Some(s) = panic.downcast_ref::<&str>() {
        s
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s
    } else {
        "no message"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn static_and_formatted_messages_are_read_and_anything_else_is_named() {
        let caught = |f: fn()| std::panic::catch_unwind(f).unwrap_err();
        assert_eq!(
            panic_message(caught(|| panic!("static")).as_ref()),
            "static"
        );
        let n = 3;
        let formatted: Box<dyn Any + Send> = Box::new(format!("formatted {n}"));
        assert_eq!(panic_message(formatted.as_ref()), "formatted 3");
        let other: Box<dyn Any + Send> = Box::new(42u8);
        assert_eq!(panic_message(other.as_ref()), "no message");
    }
}
