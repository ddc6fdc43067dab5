// A small grouped bar chart written as SVG text (no dependencies): groups along the x axis, one bar per series in
// each group, a linear y axis from 0 with round ticks, a few text lines above each bar, an optional dashed reference
// line per group (over one bar or across the group), and a legend.

import Foundation

struct BarChart {
    struct Bar {
        var series: String
        var value: Double
        /// Printed above the bar, first line nearest the title.
        var labels: [String]
    }

    /// A dashed horizontal line at `value`, over the bar of `series` (or across the group), captioned on its right.
    struct Reference {
        var value: Double
        var caption: [String]
        var series: String?
    }

    struct Group {
        var label: String
        var bars: [Bar]
        var reference: Reference?
    }

    var title: String
    var subtitle: String
    var yLabel: String
    /// Series names in legend order, with their fill colours.
    var series: [(String, String)]
    var groups: [Group]
    /// Legend entry for the reference lines, if any.
    var referenceLegend: String? = nil
    var width = 1000.0
    var height = 580.0

    static func escape(_ s: String) -> String {
        var out = ""
        for c in s {
            switch c {
            case "&": out += "&amp;"
            case "<": out += "&lt;"
            case ">": out += "&gt;"
            case "\"": out += "&quot;"
            default: out.append(c)
            }
        }
        return out
    }

    /// A tick step of 1, 2 or 5 × 10^k giving about `count` ticks up to `maximum`.
    static func tickStep(maximum: Double, count: Int = 6) -> Double {
        guard maximum > 0 else { return 1 }
        let raw = maximum / Double(count)
        let magnitude = pow(10, floor(log10(raw)))
        for m in [1.0, 2.0, 2.5, 5.0, 10.0] where m * magnitude >= raw { return m * magnitude }
        return 10 * magnitude
    }

    private static func f(_ v: Double) -> String { String(format: "%.1f", v) }

    func svg() -> String {
        let left = 90.0, right = 30.0, bottom = 70.0
        let maxValue = self.groups.flatMap { g in g.bars.map(\.value) + [g.reference?.value ?? 0] }.max() ?? 1
        let step = Self.tickStep(maximum: maxValue * 1.22)
        let yMax = (maxValue * 1.22 / step).rounded(.up) * step
        let colour = Dictionary(uniqueKeysWithValues: self.series.map { ($0.0, $0.1) })

        var s = """
            <svg xmlns="http://www.w3.org/2000/svg" width="\(Int(self.width))" height="\(Int(self.height))" \
            viewBox="0 0 \(Int(self.width)) \(Int(self.height))" font-family="Helvetica, Arial, sans-serif">
            <rect width="100%" height="100%" fill="#ffffff"/>
            <text x="\(Self.f(self.width / 2))" y="28" text-anchor="middle" font-size="19" font-weight="bold">\
            \(Self.escape(self.title))</text>

            """
        // The subtitle, wrapped at about 120 characters.
        var lines: [String] = []
        var line = ""
        for word in self.subtitle.split(separator: " ") {
            if line.count + word.count + 1 > 120 && !line.isEmpty {
                lines.append(line)
                line = ""
            }
            line += (line.isEmpty ? "" : " ") + word
        }
        if !line.isEmpty { lines.append(line) }
        for (i, l) in lines.enumerated() {
            s += "<text x=\"\(Self.f(self.width / 2))\" y=\"\(48 + 16 * i)\" text-anchor=\"middle\" font-size=\"12\" "
                + "fill=\"#444\">\(Self.escape(l))</text>\n"
        }
        // Legend.
        var lx = left
        let ly = 48.0 + 16 * Double(lines.count) + 6
        for (name, fill) in self.series {
            s += "<rect x=\"\(Self.f(lx))\" y=\"\(Self.f(ly))\" width=\"14\" height=\"14\" fill=\"\(fill)\"/>\n"
            s += "<text x=\"\(Self.f(lx + 19))\" y=\"\(Self.f(ly + 12))\" font-size=\"13\">"
                + "\(Self.escape(name))</text>\n"
            lx += 30 + Double(name.count) * 8
        }
        if let legend = self.referenceLegend {
            s += "<line x1=\"\(Self.f(lx + 6))\" y1=\"\(Self.f(ly + 7))\" x2=\"\(Self.f(lx + 34))\" "
                + "y2=\"\(Self.f(ly + 7))\" stroke=\"#1b4f72\" stroke-width=\"2\" stroke-dasharray=\"5,4\"/>\n"
            s += "<text x=\"\(Self.f(lx + 40))\" y=\"\(Self.f(ly + 12))\" font-size=\"13\">"
                + "\(Self.escape(legend))</text>\n"
        }

        let top = ly + 40
        let plotW = self.width - left - right
        let plotH = self.height - top - bottom
        func y(_ v: Double) -> Double { top + plotH * (1 - v / yMax) }

        // Grid and y axis.
        var v = 0.0
        while v <= yMax + step / 2 {
            let yy = y(v)
            s += "<line x1=\"\(Self.f(left))\" y1=\"\(Self.f(yy))\" x2=\"\(Self.f(left + plotW))\" "
                + "y2=\"\(Self.f(yy))\" stroke=\"#e5e5e5\"/>\n"
            s += "<text x=\"\(Self.f(left - 8))\" y=\"\(Self.f(yy + 4))\" text-anchor=\"end\" font-size=\"12\">"
                + "\(String(format: "%.0f", v))</text>\n"
            v += step
        }
        s += "<line x1=\"\(Self.f(left))\" y1=\"\(Self.f(top))\" x2=\"\(Self.f(left))\" y2=\"\(Self.f(top + plotH))\" "
            + "stroke=\"#333\"/>\n"
        s += "<line x1=\"\(Self.f(left))\" y1=\"\(Self.f(top + plotH))\" x2=\"\(Self.f(left + plotW))\" "
            + "y2=\"\(Self.f(top + plotH))\" stroke=\"#333\"/>\n"
        let cy = top + plotH / 2
        s += "<text x=\"24\" y=\"\(Self.f(cy))\" text-anchor=\"middle\" font-size=\"13\" "
            + "transform=\"rotate(-90 24 \(Self.f(cy)))\">\(Self.escape(self.yLabel))</text>\n"

        // Groups of bars.
        let groupW = plotW / Double(max(self.groups.count, 1))
        for (gi, g) in self.groups.enumerated() {
            let gx = left + groupW * Double(gi)
            let inner = groupW * 0.8
            let x0 = gx + (groupW - inner) / 2
            let slot = inner / Double(max(g.bars.count, 1))
            let barW = slot * 0.72
            for (bi, bar) in g.bars.enumerated() {
                let bx = x0 + slot * Double(bi) + (slot - barW) / 2
                let top = y(bar.value)
                let fill = colour[bar.series] ?? "#999999"
                s += "<rect x=\"\(Self.f(bx))\" y=\"\(Self.f(top))\" width=\"\(Self.f(barW))\" "
                    + "height=\"\(Self.f(y(0) - top))\" fill=\"\(fill)\"><title>\(Self.escape(bar.series)): "
                    + "\(Self.escape(bar.labels.joined(separator: ", ")))</title></rect>\n"
                let cx = bx + barW / 2
                for (li, label) in bar.labels.enumerated() {
                    let ty = top - 6 - 15 * Double(bar.labels.count - 1 - li)
                    let weight = li == 1 ? " font-weight=\"bold\"" : ""
                    s += "<text x=\"\(Self.f(cx))\" y=\"\(Self.f(ty))\" text-anchor=\"middle\" "
                        + "font-size=\"12\"\(weight)>\(Self.escape(label))</text>\n"
                }
                s += "<text x=\"\(Self.f(cx))\" y=\"\(Self.f(y(0) + 16))\" text-anchor=\"middle\" font-size=\"12\">"
                    + "\(Self.escape(bar.series))</text>\n"
            }
            if let r = g.reference {
                let ry = y(r.value)
                var x1 = x0
                var x2 = x0 + inner
                if let series = r.series, let bi = g.bars.firstIndex(where: { $0.series == series }) {
                    x1 = x0 + slot * Double(bi) + (slot - barW) / 2 - 6
                    x2 = x1 + barW + 12
                }
                s += "<line x1=\"\(Self.f(x1))\" y1=\"\(Self.f(ry))\" x2=\"\(Self.f(x2))\" "
                    + "y2=\"\(Self.f(ry))\" stroke=\"#1b4f72\" stroke-width=\"2\" stroke-dasharray=\"5,4\"/>\n"
                for (li, line) in r.caption.enumerated() {
                    s += "<text x=\"\(Self.f(x2 + 4))\" y=\"\(Self.f(ry + 4 + 13 * Double(li)))\" font-size=\"11\" "
                        + "fill=\"#1b4f72\">\(Self.escape(line))</text>\n"
                }
            }
            s += "<text x=\"\(Self.f(gx + groupW / 2))\" y=\"\(Self.f(y(0) + 40))\" text-anchor=\"middle\" "
                + "font-size=\"14\" font-weight=\"bold\">\(Self.escape(g.label))</text>\n"
        }
        s += "</svg>\n"
        return s
    }
}
