// iproute2's batch reader, restated: `getcmdline` (a `#` ends the physical line, a backslash right before the
// newline joins the next line) and `makeargs` (words split at blanks; a word that starts with ' or " runs to the
// next same quote, which may hold blanks; an unclosed quote ends the batch with "Unterminated quoted string").

/// One command of a batch file, after comments and continuations.
public struct BatchCommand: Sendable {
    /// The physical line the command ended on (what "Command failed FILE:LINE" names, as iproute2's cmdlineno).
    public var line: Int
    public var text: String
}

/// Why a batch could not be read (as `ip -batch` reports it, without a "Command failed" line).
public struct BatchSyntaxError: Error, CustomStringConvertible {
    public let description: String
}

public enum BatchReader {
    /// The commands of a batch file. A continuation at the end of the file ends the batch with `missing` set
    /// (iproute2 prints "Missing continuation line" and stops reading); the unfinished command is not run.
    public static func commands(_ text: String) -> (commands: [BatchCommand], missingContinuation: Bool) {
        var out: [BatchCommand] = []
        // Physical lines with whether a newline ended them.
        var lines: [(Substring, Bool)] = []
        var rest = Substring(text)
        while !rest.isEmpty {
            if let nl = rest.firstIndex(of: "\n") {
                lines.append((rest[..<nl], true))
                rest = rest[rest.index(after: nl)...]
            } else {
                lines.append((rest, false))
                rest = ""
            }
        }
        var i = 0
        while i < lines.count {
            var (text, continued) = Self.stripComment(lines[i])
            var lineNo = i + 1
            while continued {
                i += 1
                guard i < lines.count else { return (out, true) }
                let (next, more) = Self.stripComment(lines[i])
                text += next
                continued = more
                lineNo = i + 1
            }
            out.append(BatchCommand(line: lineNo, text: text))
            i += 1
        }
        return (out, false)
    }

    /// A physical line without its comment; `continued` when it still ends in a backslash before its newline.
    private static func stripComment(_ l: (Substring, Bool)) -> (String, Bool) {
        let (line, newline) = l
        if let hash = line.firstIndex(of: "#") { return (String(line[..<hash]), false) }
        if newline && line.hasSuffix("\\") { return (String(line.dropLast()), true) }
        return (String(line), false)
    }

    /// Splits a command into words as makeargs does.
    public static func words(_ line: String) throws(BatchSyntaxError) -> [String] {
        let blanks: Set<Character> = [" ", "\t", "\r", "\n"]
        var out: [String] = []
        var i = line.startIndex
        while i < line.endIndex {
            while i < line.endIndex && blanks.contains(line[i]) { i = line.index(after: i) }
            guard i < line.endIndex else { break }
            let c = line[i]
            if c == "'" || c == "\"" {
                let start = line.index(after: i)
                guard let close = line[start...].firstIndex(of: c) else {
                    throw BatchSyntaxError(description: "Unterminated quoted string")
                }
                out.append(String(line[start..<close]))
                // The character after the closing quote is consumed as the separator, whatever it is.
                i = line.index(after: close)
                if i < line.endIndex { i = line.index(after: i) }
            } else {
                var end = i
                while end < line.endIndex && !blanks.contains(line[end]) { end = line.index(after: end) }
                out.append(String(line[i..<end]))
                i = end < line.endIndex ? line.index(after: end) : end
            }
        }
        return out
    }
}
